"""Writing PEFT's own PaCA format (``peft>=0.22``), so ``PeftModel.from_pretrained(base, path)``
loads a paca adapter.

The format, as PEFT specifies it: ``adapter_config.json`` with ``"peft_type": "PACA"``, ``r``,
``paca_alpha``, ``target_modules``, ``exclude_modules``, ``layers_to_transform``,
``layers_pattern``, ``random_seed``, ``init_weights``, ``modules_to_save``, ``task_type``,
``base_model_name_or_path`` and ``inference_mode``; ``adapter_model.safetensors`` with, per layer,
``base_model.model.<module>.paca_delta`` (float32, ``out x r``) and ``.paca_indices`` (int64,
``r``), and each module trained in full as ``base_model.model.<module>.<tensor>`` (how PEFT
stores ``modules_to_save``). The effective weight is ``W[:, idx] + (paca_alpha / r) * delta``,
paca's own rule, so the values carry over unchanged.

PEFT's PaCA adapts ``nn.Linear`` only: a paca adapter on GPT-2 ``Conv1D`` layers is refused
(export it with ``paca.export_lora``, which handles Conv1D, or fold it with ``paca.merge``).

Imports: ``paca.model``, ``paca.adapters.common``.
"""

from __future__ import annotations

import torch
from torch import nn

from paca.adapters.common import PEFT_PREFIX, PEFT_WEIGHTS, base_model_name, cpu_tensors
from paca.errors import PacaError
from paca.model import adapter_copies, adapter_layers, get_config

PEFT_TYPE = "PACA"
# transformers model-class suffix -> PEFT task_type
_TASK_TYPES = {
    "ForCausalLM": "CAUSAL_LM",
    "ForSequenceClassification": "SEQ_CLS",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
    "ForConditionalGeneration": "SEQ_2_SEQ_LM",
}


def task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if name.endswith(suffix)), None)


def build(model: nn.Module, adapter_name: str) -> tuple[dict[str, torch.Tensor], dict, str]:
    """PEFT PaCA files for one adapter: (tensors, config JSON, weights file name).

    Raises:
        PacaError: the adapter holds a Conv1D layer, or its layers differ in ``r``.
    """
    if not isinstance(adapter_name, str):
        raise PacaError(
            f"adapter_name={adapter_name!r}: PEFT's PaCA files hold one adapter; save each "
            "adapter into its own folder"
        )
    config = get_config(model, adapter_name)
    layers = adapter_layers(model, adapter_name)
    conv1d = [name for name, layer, _ in layers if layer.transposed]
    if conv1d:
        raise PacaError(
            f"{conv1d[0]} is a GPT-2 Conv1D layer, which PEFT's PaCA cannot adapt (nn.Linear "
            "only); write this adapter with format='paca', paca.export_lora (LoRA handles "
            "Conv1D) or fold it into the model with paca.merge"
        )
    ranks = sorted({adapter.r for _, _, adapter in layers})
    if len(ranks) != 1:
        raise PacaError(f"PEFT's PaCA config holds one r for every layer; this adapter has {ranks}")
    tensors: dict[str, torch.Tensor] = {}
    for name, _, adapter in layers:
        tensors[f"{PEFT_PREFIX}{name}.paca_delta"] = (
            adapter.delta.detach().to("cpu", torch.float32).contiguous().clone()
        )
        tensors[f"{PEFT_PREFIX}{name}.paca_indices"] = (
            adapter.idx.detach().to("cpu", torch.int64).contiguous().clone()
        )
    saved = []
    for name, module in adapter_copies(model, adapter_name):
        saved.append(name)
        tensors |= cpu_tensors(module.state_dict(), prefix=f"{PEFT_PREFIX}{name}.")
    meta = {
        "peft_type": PEFT_TYPE,
        "task_type": task_type(model),
        "base_model_name_or_path": base_model_name(model),
        "inference_mode": True,
        "r": ranks[0],
        # PEFT types it int; paca keeps a float: write 16, not 16.0, where it is whole
        "paca_alpha": int(config.alpha) if float(config.alpha).is_integer() else config.alpha,
        # the exact layers (full names match exactly in PEFT), so no other layer is adapted
        "target_modules": [name for name, _, _ in layers],
        "exclude_modules": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "random_seed": config.seed,
        # PEFT initialises the columns, then the file's paca_indices and paca_delta replace them
        "init_weights": True,
        "modules_to_save": saved or None,
    }
    return tensors, meta, PEFT_WEIGHTS
