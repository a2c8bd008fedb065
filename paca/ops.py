"""The op contract of paca.

Each op is declared once here (``torch.library``) with its pure-torch reference kernel, which
serves any device without a kernel of its own, and its fake kernel (shapes and dtypes only)
right below it. Device kernels live in ``paca/backends/``. Output shapes
depend only on input shapes: no masks, no ``.item()``, no host syncs, so Gaudi graphs stay static
and ``torch.compile(fullgraph=True)`` sees no graph break. The autograd functions call the
kernels of the tensor's device directly (``kernels``), eager and compiled; the dispatcher's
``torch.ops.paca.*`` serve every other caller and are what ``torch.library.opcheck`` checks.

The two autograd functions at the bottom are the whole PaCA layer math:

* merged:   ``y = x @ W_eff.T + b`` where the frozen ``W_eff`` already holds the trained columns;
  backward ``grad_x = g @ W_eff`` (the frozen layer's GEMM) and
  ``grad_delta = s * g.T @ x[..., idx]``; only ``x[..., idx]`` is saved.
* additive: ``y = base(x) + s * x[..., idx] @ delta.T``; the base layer runs untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def grad_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of ``delta`` and of its gradient: fp32, or fp64 for fp64 layers."""
    # Not torch.promote_types: that is a dispatched op, and this runs in every backward.
    return torch.float64 if dtype == torch.float64 else torch.float32


# Declared with torch.library.Library rather than torch.library.custom_op: custom_op wraps every
# call in Python autograd and argument handling that cost about 100 us per call here (cProfile,
# 2 cores), against a few us for a plain dispatcher call. These ops need no autograd of their
# own: they run inside the autograd functions below, where grad mode is off.
_lib = torch.library.Library("paca", "DEF")
_lib.define("gather_cols(Tensor x, Tensor idx) -> Tensor")
_lib.define("scatter_cols(Tensor cols, Tensor idx, SymInt in_features) -> Tensor")
_lib.define("write_cols_(Tensor(a!) weight, Tensor idx, Tensor cols, int dim) -> ()")
_lib.define("partial_grad(Tensor grad_out, Tensor x_idx, float scaling) -> Tensor")


def _reference(name: str):
    """Registers the decorated function as the reference kernel of ``paca::<name>``."""

    def register(fn):
        _lib.impl(name, fn, "CompositeExplicitAutograd")
        return fn

    return register


@_reference("gather_cols")
def reference_gather_cols(x: Tensor, idx: Tensor) -> Tensor:
    """Selects input channels: ``x (..., in)``, ``idx (r,)`` -> ``(..., r)``."""
    return torch.index_select(x, -1, idx)


@torch.library.register_fake("paca::gather_cols", lib=_lib)
def _(x: Tensor, idx: Tensor) -> Tensor:
    return x.new_empty((*x.shape[:-1], idx.shape[0]))


@_reference("scatter_cols")
def reference_scatter_cols(cols: Tensor, idx: Tensor, in_features: int) -> Tensor:
    """Inverse of ``gather_cols`` for gradients: ``cols (..., r)`` -> ``(..., in)``, zeros
    elsewhere."""
    out = cols.new_zeros((*cols.shape[:-1], in_features))
    return out.index_copy_(-1, idx, cols)


@torch.library.register_fake("paca::scatter_cols", lib=_lib)
def _(cols: Tensor, idx: Tensor, in_features: int) -> Tensor:
    return cols.new_empty((*cols.shape[:-1], in_features))


@_reference("write_cols_")
def reference_write_cols_(weight: Tensor, idx: Tensor, cols: Tensor, dim: int) -> None:
    """Writes ``cols`` into ``weight`` along ``dim`` at ``idx``, in place.

    ``dim=1`` for ``nn.Linear`` (weight ``(out, in)``, cols ``(out, r)``); ``dim=0`` for GPT-2's
    ``Conv1D`` (weight ``(in, out)``, cols ``(r, out)``).
    """
    weight.index_copy_(dim, idx, cols if cols.dtype == weight.dtype else cols.to(weight.dtype))


@torch.library.register_fake("paca::write_cols_", lib=_lib)
def _(weight: Tensor, idx: Tensor, cols: Tensor, dim: int) -> None:
    return None


@_reference("partial_grad")
def reference_partial_grad(grad_out: Tensor, x_idx: Tensor, scaling: float) -> Tensor:
    """Gradient of ``delta``: ``scaling * g2d.T @ x_idx2d``.

    Args:
        grad_out (Tensor): ``(..., out)``.
        x_idx (Tensor): ``(..., r)``, the saved input columns.
        scaling (float): ``alpha / r``.

    Returns:
        Tensor: ``(out, r)`` in ``grad_dtype(grad_out.dtype)`` (fp32 for bf16/fp16/fp32).
    """
    dtype = grad_dtype(grad_out.dtype)
    g2d = grad_out.reshape(-1, grad_out.shape[-1]).to(dtype)
    x2d = x_idx.reshape(-1, x_idx.shape[-1]).to(dtype)
    return (g2d.t() @ x2d) * scaling


@torch.library.register_fake("paca::partial_grad", lib=_lib)
def _(grad_out: Tensor, x_idx: Tensor, scaling: float) -> Tensor:
    return grad_out.new_empty(
        (grad_out.shape[-1], x_idx.shape[-1]), dtype=grad_dtype(grad_out.dtype)
    )


# The ops as called by paca: dispatcher entry points (device kernels come from paca/backends).
gather_cols = torch.ops.paca.gather_cols.default
scatter_cols = torch.ops.paca.scatter_cols.default
write_cols_ = torch.ops.paca.write_cols_.default
partial_grad = torch.ops.paca.partial_grad.default

OPS = {
    "gather_cols": gather_cols,
    "scatter_cols": scatter_cols,
    "write_cols_": write_cols_,
    "partial_grad": partial_grad,
}
REFERENCE = {
    "gather_cols": reference_gather_cols,
    "scatter_cols": reference_scatter_cols,
    "write_cols_": reference_write_cols_,
    "partial_grad": reference_partial_grad,
}


# The same kernels by device type, called straight from the autograd functions below. Eager, this
# skips the dispatcher's round trip from C++ back into a Python kernel (about 2 us per gather and
# 5 us per partial_grad in tight loops, 2 cores). Compiled, torch.compile traces the kernels
# (torch code) into the graph instead of calling an opaque op from it: on the overhead preset
# (`paca bench --preset overhead --compile`) PaCA went from 2.74x to 1.97x the frozen step, on
# the SmolLM2 shape from 1.076x to 1.047x (docs/benchmarks.md). A backend kernel that is not torch
# code should call its own registered op, which the trace then keeps as one node.
_BY_DEVICE: dict[str, dict[str, Callable]] = {}


def register_kernel(name: str, device_type: str, kernel) -> None:
    """Registers a backend's kernel for ``paca::<name>`` on one device type."""
    torch.library.impl(f"paca::{name}", device_type, kernel, lib=_lib)
    _BY_DEVICE.setdefault(device_type, dict(REFERENCE))[name] = kernel


def kernels(tensor: Tensor) -> dict[str, Callable]:
    """The kernels for ``tensor``'s device: op name -> callable, each taking the op's arguments.

    The backend's own kernels, and the reference kernel for the ops it leaves out (or for every
    op on a device without a loaded backend): exactly what the dispatcher would run for
    ``torch.ops.paca.<name>``, without the trip through it.
    """
    return _BY_DEVICE.get(tensor.device.type, REFERENCE)


class _MergedLinear(torch.autograd.Function):
    """``y = linear(x, W_eff, b)`` with ``grad_delta`` routed to ``delta``; ``W_eff`` is frozen."""

    @staticmethod
    def forward(ctx, x, weight, bias, delta, idx, scaling, transposed):
        w = weight.t() if transposed else weight  # (out, in), a view for Conv1D
        # gathered before the GEMM, while x is still in cache from the op that wrote it
        x_idx = kernels(x)["gather_cols"](x, idx)  # (..., r): all the backward needs of x
        y = F.linear(x, w, bias)
        ctx.save_for_backward(x_idx, weight)
        ctx.scaling = scaling
        ctx.transposed = transposed
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x_idx, weight = ctx.saved_tensors
        grad_x = grad_bias = grad_delta = None
        if ctx.needs_input_grad[0]:
            w = weight.t() if ctx.transposed else weight
            if w.dtype != grad_out.dtype:
                w = w.to(grad_out.dtype)
            grad_x = grad_out @ w  # the frozen layer's own GEMM
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if ctx.needs_input_grad[3]:
            grad_delta = kernels(grad_out)["partial_grad"](grad_out, x_idx, ctx.scaling)
        return grad_x, None, grad_bias, grad_delta, None, None, None


def merged_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    delta: Tensor,
    idx: Tensor,
    scaling: float,
    transposed: bool = False,
) -> Tensor:
    """Linear layer whose ``weight`` already holds ``W0[:, idx] + scaling * delta`` at ``idx``.

    Args:
        x (Tensor): input of shape ``(..., in_features)``.
        weight (Tensor): frozen ``(out, in)`` weight, or ``(in, out)`` if ``transposed`` (Conv1D).
        bias (Tensor | None): ``(out,)``.
        delta (Tensor): ``(out, r)``; only its gradient is produced here, its value lives in
            ``weight``.
        idx (Tensor): ``(r,)`` int64 column indices.
        scaling (float): ``alpha / r``.
        transposed (bool): ``weight`` is stored ``(in, out)``.

    Returns:
        Tensor: ``(..., out_features)``.
    """
    return _MergedLinear.apply(x, weight, bias, delta, idx, scaling, transposed)


class _PartialLinear(torch.autograd.Function):
    """``y = base_out + scaling * x[..., idx] @ delta.T``."""

    @staticmethod
    def forward(ctx, base_out, x, delta, idx, scaling):
        dtype = base_out.dtype
        x_idx = kernels(x)["gather_cols"](x, idx).to(dtype)  # (..., r)
        w = (delta * scaling).to(dtype)  # (out, r)
        out = base_out.shape[-1]
        y = torch.addmm(base_out.reshape(-1, out), x_idx.reshape(-1, idx.shape[0]), w.t())
        ctx.save_for_backward(x_idx, delta, idx)
        ctx.scaling = scaling
        ctx.in_features = x.shape[-1]
        ctx.x_dtype = x.dtype
        return y.view(base_out.shape)

    @staticmethod
    def backward(ctx, grad_out):
        x_idx, delta, idx = ctx.saved_tensors
        grad_x = grad_delta = None
        kernel = kernels(grad_out)
        if ctx.needs_input_grad[1]:
            w = (delta * ctx.scaling).to(grad_out.dtype)
            grad_x = kernel["scatter_cols"](grad_out @ w, idx, ctx.in_features).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            grad_delta = kernel["partial_grad"](grad_out, x_idx, ctx.scaling)
        return grad_out, grad_x, grad_delta, None, None


def partial_linear(
    base_out: Tensor, x: Tensor, delta: Tensor, idx: Tensor, scaling: float
) -> Tensor:
    """Adds the PaCA update to a base layer's output.

    Args:
        base_out (Tensor): the base layer's output ``(..., out_features)``; sets the compute dtype.
        x (Tensor): the base layer's input ``(..., in_features)``.
        delta (Tensor): ``(out, r)``.
        idx (Tensor): ``(r,)`` int64 column indices.
        scaling (float): ``alpha / r``.

    Returns:
        Tensor: ``base_out + scaling * x[..., idx] @ delta.T``, shaped like ``base_out``.
    """
    return _PartialLinear.apply(base_out, x, delta, idx, scaling)
