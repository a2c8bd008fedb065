"""Hugging Face ``transformers.Trainer`` with PaCA models."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from paca.model import is_enabled

# transformers' marker for "trainable adapters are attached" (set by its own PEFT integration)
_ADAPTERS_MARK = "_hf_peft_config_loaded"


@contextlib.contextmanager
def quantized_training(model: nn.Module) -> Iterator[nn.Module]:
    """Lets ``transformers.Trainer`` accept a quantized model that carries PaCA adapters.

    The Trainer refuses a quantized model (``BitsAndBytesConfig``) unless a PEFT adapter is
    attached; it recognises those by ``PeftModel`` or by transformers' adapter marker. PaCA's
    ``delta`` parameters are trainable adapters too, so the marker is set while the Trainer is
    built (``with quantized_training(model): trainer = Trainer(model, ...)``) and removed
    afterwards, so ``save_pretrained`` keeps its usual behaviour. Refuses a model without PaCA
    adapters, which the Trainer would rightly refuse.
    """
    if not getattr(model, "is_quantized", False):
        yield model
        return
    if not is_enabled(model):
        raise ValueError(
            f"{type(model).__name__} is quantized and has no PaCA adapters: call paca.enable "
            "first (only the adapters of a quantized model can be trained)"
        )
    own = vars(model)  # the instance's own attributes (transformers' default is on the class)
    had, previous = _ADAPTERS_MARK in own, own.get(_ADAPTERS_MARK)
    setattr(model, _ADAPTERS_MARK, True)
    try:
        yield model
    finally:
        if had:
            setattr(model, _ADAPTERS_MARK, previous)
        else:
            delattr(model, _ADAPTERS_MARK)
