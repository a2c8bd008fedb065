"""paca: Partial Connection Adaptation (PaCA) for PyTorch and Hugging Face models.

PaCA fine-tunes ``r`` input columns of each frozen linear weight: the same GEMMs as the frozen
model, and only ``x[..., idx]`` kept for the backward pass.

    import paca
    model = paca.enable(model, r=8, alpha=16)   # train as usual
    paca.save_adapter(model, "adapter/")

The package, bottom to top (each layer imports only those below it):

    backends/    one file per device: probe, "auto" rank, hint, kernels (the only place that
                 names a device)
    ops          the op contract (torch.library) and the two autograd functions
    base_layer   what kind of layer a module is (Linear, Conv1D, quantized, offloaded)
    quant        dequantizers (a registry) and bitsandbytes' CPU kernel switch
    layer        PacaLinear and TrainedCopy; the optimizer step hook of merged mode
    selection    column-selection strategies (a registry)
    config       PacaConfig
    targets      default targets per architecture, matching
    state        PacaState, the one object paca keeps on a model
    dropbp       DropBP: skip the backward of random residual branches (any trained model)
    model        the lifecycle: enable, adapters, merge, unload, disabled, sync_weights
    summary      parameter counts
    adapters/    file formats: paca's own, PEFT PaCA, PEFT LoRA export, foreign readers
    integrations/  transformers Trainer, Gaudi (lazy imports)
    recipes/     applications: train, bench, model loading (the library never imports them)
    cli          the ``paca`` command: flags in, one-line errors out

This file is the public API only.
"""

from paca import backends as _backends
from paca.adapters import export_gguf_lora, export_lora, load_adapter, save_adapter, write_gguf
from paca.config import PacaConfig
from paca.dropbp import drop_backward, remove_drop_backward
from paca.errors import MissingDependency, PacaError
from paca.layer import PacaLinear
from paca.model import (
    active_adapter,
    adapter_names,
    add_adapter,
    delete_adapter,
    disabled,
    enable,
    get_config,
    get_state,
    merge,
    paca_layers,
    set_adapter,
    sync_weights,
    unload,
)
from paca.summary import ParameterCount, print_trainable_parameters, trainable_parameters

__version__ = "0.2.0"

# CPU kernels register at import: that touches no device. Other backends register their kernels
# when a model is enabled on such a device.
_backends.load("cpu")


def __getattr__(name: str):
    if name == "Trainer":  # imports transformers' Trainer only when asked for
        from paca.integrations.hf import Trainer

        return Trainer
    raise AttributeError(f"module 'paca' has no attribute {name!r}")


__all__ = [
    "MissingDependency",
    "PacaConfig",
    "PacaError",
    "PacaLinear",
    "ParameterCount",
    "Trainer",
    "active_adapter",
    "adapter_names",
    "add_adapter",
    "delete_adapter",
    "disabled",
    "drop_backward",
    "enable",
    "export_gguf_lora",
    "export_lora",
    "get_config",
    "get_state",
    "load_adapter",
    "merge",
    "paca_layers",
    "print_trainable_parameters",
    "remove_drop_backward",
    "save_adapter",
    "set_adapter",
    "sync_weights",
    "trainable_parameters",
    "unload",
    "write_gguf",
]
