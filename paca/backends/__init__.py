"""Backends: one file per device with its kernels for the ops of ``paca.ops``, and this table.

Each backend module declares, at top level and nothing else:

* ``DEVICE_TYPE`` (str): the ``torch.device`` type it serves (``"cuda"``).
* ``AUTO_RANK`` (int): its place in ``device="auto"`` (lowest available wins; the CPU is last).
* ``HINT`` (str | None): why the device may be missing here, shown when it is asked for but
  absent.
* ``is_available() -> bool``: the probe; it runs only when a user or ``"auto"`` asks.
* ``KERNELS`` (dict): op name -> kernel; ops it leaves out run their reference kernel.
* optionally ``synchronize(device)``, ``max_memory_allocated(device)``,
  ``reset_peak_memory_stats(device)`` where ``torch.<device type>`` lacks them.
* optionally ``bf16_support(device) -> (bool, str)``: whether the device computes bf16
  natively, and why (what ``precision="auto"`` of ``paca train`` asks).
* optionally ``STATIC_SHAPES = True``: the device compiles a graph per input shape, so shapes
  that depend on the data are to be avoided there (``static_shapes``).

Adding a device is one file in this folder plus one line in ``MODULES``. Importing a backend
module touches no device: CUDA is not initialised and ``habana_frameworks`` is not imported
until a probe runs. Only this package names devices; the rest of paca calls the ops.

Imports: ``paca.ops`` only.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from paca import ops
from paca.errors import PacaError

MODULES: tuple[str, ...] = (
    "paca.backends.cpu",
    "paca.backends.cuda",
    "paca.backends.hpu",
    "paca.backends.xpu",
    "paca.backends.mps",
)
# Device types whose tensors never need kernels of their own: meta tensors hold no data (an
# offloaded weight, loaded per call by accelerate's hooks, lives there between calls).
NO_BACKEND = frozenset({"meta"})
_loaded: dict[str, ModuleType] = {}


def table() -> dict[str, ModuleType]:
    """``device type -> backend module`` for every entry of ``MODULES``, in ``"auto"`` order."""
    modules = [importlib.import_module(name) for name in MODULES]
    return {m.DEVICE_TYPE: m for m in sorted(modules, key=lambda m: m.AUTO_RANK)}


def device_types() -> list[str]:
    """The device types paca has a backend for, in ``"auto"`` order."""
    return list(table())


def load(device_type: str) -> ModuleType:
    """Registers the kernels of one backend (once) and returns its module.

    Registering a kernel for a device's dispatch key touches no device, so tests load every
    backend on a CPU-only machine and call its kernels on CPU tensors.

    Raises:
        PacaError: no backend serves ``device_type``.
    """
    backends = table()
    if device_type not in backends:
        raise PacaError(
            f"paca has no backend for device type {device_type!r}; known: {sorted(backends)}"
        )
    if device_type not in _loaded:
        module = backends[device_type]
        for name, kernel in module.KERNELS.items():
            ops.register_kernel(name, device_type, kernel)
        _loaded[device_type] = module
    return _loaded[device_type]


def load_for(devices) -> None:
    """Loads the backends of the devices a model's tensors live on (``meta`` needs none)."""
    for device_type in sorted({torch.device(d).type for d in devices} - NO_BACKEND):
        load(device_type)


def loaded() -> list[str]:
    return sorted(_loaded)


def is_available(device_type: str) -> bool:
    backend = table().get(device_type)
    return backend is not None and bool(backend.is_available())


def resolve_device(device: str | torch.device, current: torch.device | None = None) -> torch.device:
    """Turns the user's ``device`` setting into a ``torch.device``, or explains why it cannot.

    ``"auto"`` keeps a model that already sits on an accelerator where it is, and otherwise picks
    the first available backend in ``AUTO_RANK`` order (HPU, CUDA, XPU, MPS, then the CPU).

    Raises:
        PacaError: ``device`` is not a device, has no backend, or is not available here.
    """
    backends = table()
    text = str(device)
    if text == "auto":
        if current is not None and current.type in backends and current.type != "cpu":
            return current
        for device_type, backend in backends.items():
            if backend.is_available():
                return torch.device(device_type)
        return torch.device("cpu")
    names = ", ".join(repr(t) for t in ["auto", *backends])
    try:
        resolved = torch.device(text)
    except RuntimeError as exc:
        raise PacaError(
            f"device={text!r} is not a device; use one of {names} (optionally 'cuda:N')"
        ) from exc
    if resolved.type not in backends:
        raise PacaError(f"device={text!r} has no paca backend; use one of {names}")
    backend = backends[resolved.type]
    if not backend.is_available():
        raise PacaError(
            f"device={text!r} is not available here: {backend.HINT}; use device='cpu' or 'auto'"
        )
    return resolved


def _device_function(device: torch.device, name: str):
    """The backend's own ``name``, else ``torch.<type>.<name>``, else ``torch.accelerator``'s
    when ``device`` is the current accelerator, else ``None`` (``torch.mps`` has no peak
    memory counters, for one)."""
    backend = table().get(device.type)
    function = getattr(backend, name, None) or getattr(
        getattr(torch, device.type, None), name, None
    )
    if function is not None:
        return function
    accelerator = getattr(torch, "accelerator", None)
    current = accelerator.current_accelerator() if accelerator is not None else None
    if current is not None and current.type == device.type:
        return getattr(accelerator, name, None)
    return None


def static_shapes(device: torch.device) -> bool:
    """Whether ``device`` wants shapes that do not depend on the data (its backend's
    ``STATIC_SHAPES``): a Gaudi recompiles its graph for every new shape."""
    return bool(getattr(table().get(device.type), "STATIC_SHAPES", False))


def synchronize(device: torch.device) -> None:
    """Waits for queued work on ``device`` (for timing); a no-op on the CPU."""
    if device.type != "cpu":
        function = _device_function(device, "synchronize")
        if function is not None:
            function(device)


def device_memory(device: torch.device) -> dict[str, int] | None:
    """Peak bytes allocated on an accelerator since the last reset; ``None`` on the CPU and on
    devices without a peak counter."""
    function = None if device.type == "cpu" else _device_function(device, "max_memory_allocated")
    if function is None:
        return None
    return {"max_memory_allocated": int(function(device))}


def reset_device_memory(device: torch.device) -> None:
    function = None if device.type == "cpu" else _device_function(device, "reset_peak_memory_stats")
    if function is not None:
        function(device)


def bf16_support(device: torch.device) -> tuple[bool, str]:
    """Whether ``device`` computes bf16 natively (faster than fp32), and why, in words: the
    backend's ``bf16_support`` probe; a backend without one is taken not to."""
    probe = getattr(table().get(device.type), "bf16_support", None)
    if probe is None:
        return False, f"paca does not know whether {device.type} computes bf16 natively"
    return probe(device)
