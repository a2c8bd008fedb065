"""PacaLinear: one adapted linear layer (``nn.Linear`` or transformers' GPT-2 ``Conv1D``)."""

from __future__ import annotations

import copy
import sys
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from paca import ops


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` class if transformers is loaded (a GPT-2 model implies it is)."""
    if "transformers" not in sys.modules:
        return None
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_conv1d(module: nn.Module) -> bool:
    cls = conv1d_type()
    return cls is not None and isinstance(module, cls)


def is_linear(module: nn.Module) -> bool:
    """Layers paca can adapt: ``nn.Linear`` (and subclasses, quantized ones included) and Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear or Conv1D layer."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def has_user_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or getattr(module, "_hf_hook", None) is not None  # accelerate's offload/device hooks
    )


def merged_unsupported_reason(module: nn.Module) -> str | None:
    """Why merged mode cannot be used on ``module``, or ``None`` if it can.

    Merged mode writes into the weight and bypasses the layer's own forward, so it needs a plain,
    local, floating-point weight and a layer whose forward is exactly the linear map.
    """
    if type(module) is not nn.Linear and not (is_conv1d(module) and type(module) is conv1d_type()):
        return f"{type(module).__name__} has a forward of its own"
    weight = module.weight
    if type(weight.data) is not torch.Tensor:
        return f"its weight is a {type(weight.data).__name__} (sharded or wrapped)"
    if not weight.dtype.is_floating_point:
        return f"its weight has dtype {weight.dtype}"
    if weight.is_meta:
        return "its weight is on the meta device"
    return None


# Layers whose delta an optimizer may own, by id(delta); used by the optimizer step hook.
_LAYERS: weakref.WeakValueDictionary[int, PacaLinear] = weakref.WeakValueDictionary()
_hook_handle = None


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    # Runs after every optimizer.step() of every optimizer: re-write the columns of the layers
    # whose delta this optimizer owns. Keeping the write out of forward keeps forward free of
    # data-dependent guards (torch.compile) and of per-call copies.
    if not _LAYERS:
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            layer = _LAYERS.get(id(param))
            if layer is not None and layer.delta is param:
                layer.sync_weight()


def _install_optimizer_hook() -> None:
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_after_optimizer_step)


class PacaLinear(nn.Module):
    """A frozen linear layer of which ``r`` input columns are trained.

    The effective weight is ``W0`` with ``W_eff[:, idx] = W0[:, idx] + scaling * delta``.

    Args:
        base_layer (nn.Module): ``nn.Linear`` or transformers ``Conv1D`` (kept as a child).
        idx (torch.Tensor): sorted int64 column indices of shape ``(r,)``.
        alpha (float): ``scaling = alpha / r``.
        mode (str): ``"merged"`` or ``"additive"``.
    """

    def __init__(self, base_layer: nn.Module, idx: torch.Tensor, alpha: float, mode: str):
        super().__init__()
        if mode not in ("merged", "additive"):
            raise ValueError(f"mode must be 'merged' or 'additive', got {mode!r}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = linear_shape(base_layer)
        self.transposed = is_conv1d(base_layer)
        self.r = int(idx.numel())
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        self.mode = mode
        weight = base_layer.weight
        device = weight.device
        self.register_buffer("idx", idx.to(device=device, dtype=torch.long))
        delta_dtype = (
            ops.grad_dtype(weight.dtype) if weight.dtype.is_floating_point else torch.float32
        )
        self.delta = nn.Parameter(
            torch.zeros(self.out_features, self.r, dtype=delta_dtype, device=device)
        )
        if mode == "merged":
            # W0[:, idx], kept to restore the base model bit-exactly (unload, disable).
            self.register_buffer("base_cols", self._read_cols())
        self._synced_version = self.delta._version
        self._disabled = 0
        _LAYERS[id(self.delta)] = self
        _install_optimizer_hook()

    def __setstate__(self, state):
        # copy.deepcopy(model) builds layers without __init__: register the copy's delta too.
        super().__setstate__(state)
        _LAYERS[id(self.delta)] = self

    # -- views of the base layer, so code that inspects models keeps working
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha:g}, mode={self.mode}"
        )

    # -- the columns inside the base weight (merged mode)
    def _read_cols(self) -> torch.Tensor:
        """``W[:, idx]`` as ``(out, r)``, copied."""
        weight = self.base_layer.weight.detach()
        if self.transposed:
            return weight.index_select(0, self.idx).t().contiguous()
        return weight.index_select(1, self.idx)

    def _write_cols(self, cols: torch.Tensor) -> None:
        """Writes ``(out, r)`` columns into the base weight at ``idx``."""
        weight = self.base_layer.weight
        with torch.no_grad():
            if self.transposed:
                ops.write_cols_(weight, self.idx, cols.t().contiguous(), 0)
            else:
                ops.write_cols_(weight, self.idx, cols, 1)

    def _merged_cols(self) -> torch.Tensor:
        with torch.no_grad():  # one fused op: base + scaling * delta, no detach needed
            cols = torch.add(self.base_cols.to(self.delta.dtype), self.delta, alpha=self.scaling)
        return cols.to(self.base_layer.weight.dtype)

    def sync_weight(self, force: bool = False) -> None:
        """Merged mode: re-writes the trained columns if ``delta`` changed since the last write."""
        if self.mode != "merged" or self._disabled:
            return
        if force or self.delta._version != self._synced_version:
            self._write_cols(self._merged_cols())
            self._synced_version = self.delta._version

    def restore_base(self) -> None:
        """Merged mode: puts ``W0[:, idx]`` back into the weight (bit-exact)."""
        if self.mode == "merged":
            self._write_cols(self.base_cols)

    # -- switching
    def disable(self) -> None:
        if self._disabled == 0:
            self.restore_base()
        self._disabled += 1

    def enable(self) -> None:
        if self._disabled == 0:
            raise RuntimeError("PacaLinear.enable() called more often than disable()")
        self._disabled -= 1
        if self._disabled == 0:
            self.sync_weight(force=True)

    def set_columns(self, idx: torch.Tensor, delta: torch.Tensor) -> None:
        """Loads an adapter: new column indices and values (``delta`` of shape ``(out, r)``)."""
        if idx.shape != self.idx.shape or delta.shape != self.delta.shape:
            raise ValueError(
                f"adapter shapes idx {tuple(idx.shape)}, delta {tuple(delta.shape)} do not fit a "
                f"layer with r={self.r}, out_features={self.out_features}"
            )
        with torch.no_grad():
            if self.mode == "merged" and not self._disabled:
                self.restore_base()
            self.idx.copy_(idx)
            if self.mode == "merged":
                self.base_cols.copy_(self._read_cols())
            self.delta.copy_(delta)
        self.sync_weight(force=True)

    def fold(self) -> None:
        """Leaves ``W0[:, idx] + scaling * delta`` in the base weight (merge)."""
        if self.mode == "merged":
            self.sync_weight(force=True)
        else:
            cols = self._read_cols().to(self.delta.dtype) + self.scaling * self.delta.detach()
            self._write_cols(cols.to(self.base_layer.weight.dtype))

    # -- compute
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._disabled:
            return self.base_layer(x, *args, **kwargs)
        if self.mode == "additive":
            return ops.partial_linear(
                self.base_layer(x, *args, **kwargs), x, self.delta, self.idx, self.scaling
            )
        if not torch.compiler.is_compiling() and self.delta._version != self._synced_version:
            # Safety net for hand edits of delta outside an optimizer step; never taken while
            # compiling (a data-dependent guard), where the optimizer hook does the write.
            self.sync_weight()
        weight, bias = self.base_layer.weight, self.base_layer.bias
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Cast as autocast would for a frozen linear, so the GEMM runs in the autocast dtype.
            dtype = torch.get_autocast_dtype(device_type)
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if not (torch.is_grad_enabled() and self.delta.requires_grad):
            # Inference: exactly the frozen layer, nothing gathered or saved.
            return F.linear(x, weight.t() if self.transposed else weight, bias)
        return ops.merged_linear(
            x, weight, bias, self.delta, self.idx, self.scaling, self.transposed
        )


class TrainedCopy(nn.Module):
    """A module trained in full beside the adapters (a classification head, say).

    Keeps the original untouched so ``disabled``/``unload`` give back the base model.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.trained = copy.deepcopy(original)
        self._disabled = 0

    def forward(self, *args, **kwargs):
        return (self.original if self._disabled else self.trained)(*args, **kwargs)

    def disable(self) -> None:
        self._disabled += 1

    def enable(self) -> None:
        self._disabled -= 1
