"""``paca generate``: the answer of a base model with a PaCA adapter to one prompt.

    from paca.recipes.generate import generate, load
    model, tokenizer = load("paca-out/adapter")          # base model + adapter
    print(generate(model, tokenizer, "Which standard-library module is this docstring from? ..."))

The prompt goes through the model's chat template (as a user turn) when it has one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

import paca
from paca.adapters import ADAPTER_CONFIG
from paca.errors import PacaError
from paca.recipes import smollm2
from paca.recipes.loading import load_model, runnable_dtype


def recorded_base(adapter: str | Path) -> str | None:
    """The base model an adapter's config records (``base_model_name_or_path``: a folder or a
    hub id), or ``None``."""
    config = Path(adapter) / ADAPTER_CONFIG
    try:
        name = json.loads(config.read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        name = None
    return name if isinstance(name, str) and name else None


def base_model_of(adapter: str | Path) -> str:
    """The base model an adapter was trained on, when its folder still exists; else SmolLM2."""
    name = recorded_base(adapter)
    if name and Path(name).is_dir():
        return name
    return str(smollm2.model_folder())


def load(adapter: str | Path, model: str | None = None, device: str = "cpu", dtype=None):
    """``(model, tokenizer)``: the base model (``model``, else ``base_model_of(adapter)``) with
    the adapter loaded, in eval mode.

    Args:
        dtype (torch.dtype | None): the dtype the base model computes in; ``None`` picks one by
            device (``runnable_dtype``: a bf16 checkpoint stays bf16 where the device computes
            bf16 natively, fp32 elsewhere). Pass ``torch.float32`` to compare with an engine
            that runs the export in fp32: which precision ``None`` gives depends on the CPU.

    Raises:
        PacaError: no such adapter folder, or the adapter does not fit the model.
    """
    import transformers

    if not Path(adapter).is_dir():
        raise PacaError(f"adapter={adapter}: no such folder")
    name = model or base_model_of(adapter)
    if dtype is None:
        dtype = runnable_dtype(name, device)
    base = load_model(name, str(adapter), dtype=dtype)
    paca.load_adapter(base, adapter, device=device)
    return base.eval(), transformers.AutoTokenizer.from_pretrained(name)


def prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    """``(1, tokens)``: ``prompt`` as a user turn of the chat template, ready for the answer."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64) -> str:
    """The greedy answer of ``model`` to ``prompt`` (special tokens removed).

    Raises:
        PacaError: ``max_new_tokens`` < 1, or the prompt and answer exceed the model's context.
    """
    if max_new_tokens < 1:
        raise PacaError(f"max_new_tokens={max_new_tokens} must be >= 1")
    ids = prompt_ids(tokenizer, prompt).to(next(model.parameters()).device)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and ids.shape[1] + max_new_tokens > context:
        raise PacaError(
            f"the prompt has {ids.shape[1]} tokens; with max_new_tokens={max_new_tokens} that "
            f"exceeds the model's context of {context}: shorten the prompt or lower "
            "max_new_tokens"
        )
    (answer,) = greedy(model, tokenizer, ids, torch.ones_like(ids), max_new_tokens)
    return answer.strip()


@torch.no_grad()
def greedy(model, tokenizer, ids, attention_mask, max_new_tokens: int) -> list[str]:
    """Greedy continuations of a (left-padded) batch ``ids (batch, tokens)``, decoded without
    special tokens."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return tokenizer.batch_decode(out[:, ids.shape[1] :], skip_special_tokens=True)
