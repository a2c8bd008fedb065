"""Backends: per-device kernels for the ops of ``paca.ops``, and device resolution.

Nothing here touches a device at import: CUDA is not initialised and ``habana_frameworks`` is
not imported until a user asks for that device. Adding a device is one file in this folder plus
one line in ``_MODULES``.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import torch

from paca import ops

_MODULES = {
    "cpu": "paca.backends.cpu",
    "cuda": "paca.backends.cuda",
    "hpu": "paca.backends.hpu",
}
_loaded: dict[str, ModuleType] = {}


def load(device_type: str) -> ModuleType:
    """Registers the kernels of one backend (once) and returns its module.

    Registering a kernel for the ``cuda`` or ``hpu`` dispatch key touches no device, so tests
    load every backend on a CPU-only machine and call its kernels on CPU tensors.
    """
    if device_type not in _MODULES:
        raise ValueError(
            f"paca has no backend for device type {device_type!r}; known: {sorted(_MODULES)}"
        )
    if device_type not in _loaded:
        module = importlib.import_module(_MODULES[device_type])
        for name, kernel in module.KERNELS.items():
            ops.register_kernel(name, device_type, kernel)
        _loaded[device_type] = module
    return _loaded[device_type]


def loaded() -> list[str]:
    return sorted(_loaded)


def _hpu_available() -> bool:
    # Only probe Gaudi when its plugin is installed; importing it registers torch.hpu.
    if (
        "habana_frameworks" not in sys.modules
        and importlib.util.find_spec("habana_frameworks") is None
    ):
        return False
    importlib.import_module("habana_frameworks.torch")
    return hasattr(torch, "hpu") and torch.hpu.is_available()


def is_available(device_type: str) -> bool:
    if device_type == "cpu":
        return True
    if device_type == "cuda":
        return torch.cuda.is_available()
    if device_type == "hpu":
        return _hpu_available()
    return False


def resolve_device(device: str | torch.device, current: torch.device | None = None) -> torch.device:
    """Turns the user's ``device`` setting into a ``torch.device``, or explains why it cannot.

    ``"auto"`` keeps a model that already sits on an accelerator where it is, and otherwise picks
    an HPU, then a CUDA GPU, then the CPU.
    """
    text = str(device)
    if text == "auto":
        if current is not None and current.type in _MODULES and current.type != "cpu":
            return current
        for candidate in ("hpu", "cuda"):
            if is_available(candidate):
                return torch.device(candidate)
        return torch.device("cpu")
    try:
        resolved = torch.device(text)
    except RuntimeError as exc:
        raise ValueError(
            f"device={text!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'hpu'"
        ) from exc
    if resolved.type not in _MODULES:
        raise ValueError(
            f"device={text!r} has no paca backend; use one of 'auto', {sorted(_MODULES)}"
        )
    if not is_available(resolved.type):
        hint = {
            "cuda": "torch.cuda.is_available() is False (no GPU, or a CPU build of torch)",
            "hpu": "habana_frameworks is not installed or sees no Gaudi (it ships only in "
            "Intel's Gaudi images, not on PyPI)",
        }[resolved.type]
        raise ValueError(
            f"device={text!r} is not available here: {hint}; use device='cpu' or 'auto'"
        )
    return resolved


def synchronize(device: torch.device) -> None:
    """Waits for queued work on ``device`` (for timing); a no-op on the CPU."""
    if device.type != "cpu":
        getattr(torch, device.type).synchronize(device)


def device_memory(device: torch.device) -> dict[str, int] | None:
    """Peak bytes allocated on an accelerator since the last reset, or ``None`` on the CPU."""
    if device.type == "cpu":
        return None
    module = getattr(torch, device.type)
    return {"max_memory_allocated": int(module.max_memory_allocated(device))}


def reset_device_memory(device: torch.device) -> None:
    if device.type != "cpu":
        getattr(torch, device.type).reset_peak_memory_stats(device)
