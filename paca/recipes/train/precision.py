"""The precision a run computes in (fp32 or bf16), and what it leaves in the environment."""

from __future__ import annotations

import contextlib
import os

import torch

from paca import backends


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


def trained_in_fp32(model) -> None:
    """Every trainable tensor in fp32 (a head or LoRA matrices made in a bf16 model's dtype):
    the optimizer's updates are then never rounded to bf16."""
    for param in model.parameters():
        if param.requires_grad and param.dtype in (torch.bfloat16, torch.float16):
            param.data = param.data.float()
