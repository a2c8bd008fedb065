"""paca: Partial Connection Adaptation (PaCA) for PyTorch and Hugging Face models.

PaCA fine-tunes ``r`` input columns of each frozen linear weight: the same GEMMs as the frozen
model, and only ``x[..., idx]`` kept for the backward pass.

    import paca
    model = paca.enable(model, r=8, alpha=16)   # train as usual
    paca.save_adapter(model, "adapter/")
"""

from paca import backends as _backends
from paca.checkpoint import load_adapter, save_adapter
from paca.config import PacaConfig
from paca.interop import export_lora
from paca.layer import PacaLinear
from paca.model import (
    ParameterCount,
    adapter_names,
    add_adapter,
    delete_adapter,
    disabled,
    enable,
    merge,
    paca_layers,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unload,
)

__version__ = "0.1.0"

# CPU kernels register at import: that touches no device. CUDA and HPU kernels register when a
# model is enabled on such a device.
_backends.load("cpu")


def __getattr__(name: str):
    if name == "Trainer":  # imports transformers' Trainer only when asked for
        from paca.integrations.hf import Trainer

        return Trainer
    raise AttributeError(f"module 'paca' has no attribute {name!r}")


__all__ = [
    "PacaConfig",
    "Trainer",
    "adapter_names",
    "add_adapter",
    "delete_adapter",
    "set_adapter",
    "PacaLinear",
    "ParameterCount",
    "disabled",
    "enable",
    "export_lora",
    "load_adapter",
    "merge",
    "paca_layers",
    "print_trainable_parameters",
    "save_adapter",
    "trainable_parameters",
    "unload",
]
