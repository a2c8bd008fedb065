"""What kind of base layer a module is: the one place that answers it.

paca adapts three kinds of layer:

* ``linear``: ``nn.Linear`` and its subclasses, which covers bitsandbytes ``Linear4bit`` (nf4,
  fp4) and ``Linear8bitLt`` and torchao's quantized ``nn.Linear`` (a tensor-subclass weight);
* ``conv1d``: transformers' GPT-2 ``Conv1D``, whose weight is stored ``(in, out)``;
* ``forward-only``: any other module with integer ``in_features``/``out_features`` (or GPTQ's
  ``infeatures``/``outfeatures``) and no submodules, whose forward maps ``(..., in)`` to
  ``(..., out)`` linearly: GPTQ, AWQ, HQQ-style layers. paca needs nothing else from them.

``describe(module)`` returns a ``BaseLayer`` with everything the rest of paca asks about a
layer (shape, layout, whether merged mode can write into it and why not, where it computes), or
``None`` for a module paca cannot adapt.

Imports: torch only (transformers' ``Conv1D`` only once transformers is loaded).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn

# The layers paca adapts, for error messages.
SUPPORTED = (
    "nn.Linear and its subclasses (bitsandbytes Linear4bit and Linear8bitLt, torchao-quantized "
    "nn.Linear), transformers Conv1D, and any module with integer in_features/out_features "
    "whose forward maps (..., in_features) to (..., out_features) linearly (GPTQ, AWQ)"
)


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class if transformers is loaded (a GPT-2 model implies it is)."""
    if "transformers" not in sys.modules:
        return None
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    cls = conv1d_type()
    return cls is not None and isinstance(module, cls)


def features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` a forward-only layer declares, or ``None``."""
    for names in (("in_features", "out_features"), ("infeatures", "outfeatures")):
        values = [getattr(module, n, None) for n in names]
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
            return values[0], values[1]
    return None


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is not a plain floating-point tensor (or it has none)."""
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return True
    return type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point


def offload_hook(module: nn.Module):
    """accelerate's hook on ``module`` (``cpu_offload``, ``disk_offload``, ``dispatch_model``
    and ``device_map`` loading attach one), or ``None``."""
    return getattr(module, "_hf_hook", None)


def is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate keeps this layer's weights elsewhere and loads them per call (they
    sit on the ``meta`` device between calls)."""
    return offload_hook(module) is not None and any(
        t.is_meta for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
    )


def layer_device(module: nn.Module) -> torch.device:
    """Where the layer computes: accelerate's execution device when a hook moves it there,
    else the device of its parameters or buffers (quantized layers may hold only buffers)."""
    hook = offload_hook(module)
    execution = getattr(hook, "execution_device", None)
    if execution is not None:
        return torch.device(execution if not isinstance(execution, int) else f"cuda:{execution}")
    for tensor in (*module.parameters(), *module.buffers()):
        if not tensor.is_meta:
            return tensor.device
    return torch.device("cpu")


def has_user_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks or module._forward_pre_hooks or offload_hook(module) is not None
    )


@dataclass(frozen=True)
class BaseLayer:
    """What paca needs to know about a layer it adapts."""

    kind: str  # "linear", "conv1d" or "forward-only"
    in_features: int
    out_features: int
    # the weight is stored (in, out): Conv1D
    transposed: bool
    # why merged mode cannot write into this layer (None: it can)
    merged_unsupported: str | None
    # forward hooks or accelerate hooks that merged mode would bypass
    hooked: bool


def describe(module: nn.Module) -> BaseLayer | None:
    """The ``BaseLayer`` of ``module``, or ``None`` if paca cannot adapt it."""
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        kind = "conv1d"
    elif isinstance(module, nn.Linear):
        n_in, n_out, kind = module.in_features, module.out_features, "linear"
    elif features(module) is not None and next(module.children(), None) is None:
        (n_in, n_out), kind = features(module), "forward-only"
    else:
        return None
    return BaseLayer(
        kind=kind,
        in_features=n_in,
        out_features=n_out,
        transposed=kind == "conv1d",
        merged_unsupported=_merged_unsupported(module),
        hooked=has_user_hooks(module),
    )


def is_linear(module: nn.Module) -> bool:
    """Whether paca can adapt ``module`` (see ``describe``)."""
    return describe(module) is not None


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a layer paca can adapt."""
    info = describe(module)
    if info is None:
        raise TypeError(f"{type(module).__name__} is not a layer paca adapts ({SUPPORTED})")
    return info.in_features, info.out_features


def _merged_unsupported(module: nn.Module) -> str | None:
    # Merged mode writes into the weight and bypasses the layer's own forward, so it needs a
    # plain, local, floating-point weight and a layer whose forward is exactly the linear map.
    if type(module) is not nn.Linear and not (is_conv1d(module) and type(module) is conv1d_type()):
        return f"{type(module).__name__} has a forward of its own"
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return "it has no weight tensor"
    if is_offloaded(module) or weight.is_meta:
        return "its weight is offloaded (on the meta device, loaded per call by accelerate)"
    if type(weight.data) is not torch.Tensor:
        return f"its weight is a {type(weight.data).__name__} (sharded or wrapped)"
    if hasattr(weight, "ds_id"):
        return "its weight is partitioned by DeepSpeed ZeRO-3"
    if not weight.dtype.is_floating_point:
        return f"its weight has dtype {weight.dtype}"
    return None


def read_cols(module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """``W[:, idx]`` of a plain ``nn.Linear`` or ``Conv1D`` as a new ``(out, r)`` tensor."""
    weight = module.weight.detach()
    idx = idx.to(weight.device)
    if is_conv1d(module):
        return weight.index_select(0, idx).t().contiguous()
    return weight.index_select(1, idx)
