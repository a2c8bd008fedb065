"""PacaLinear: one adapted linear layer, its named adapters, and the step hook of merged mode.

Imports: ``paca.ops`` (the math), ``paca.base_layer`` (what the wrapped layer is),
``paca.quant`` (bitsandbytes' CPU kernel switch).
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from paca import base_layer as kinds
from paca import ops, quant
from paca.errors import PacaError

# Layers whose delta an optimizer may own, by id(delta); used by the optimizer step hook.
_LAYERS: weakref.WeakValueDictionary[int, PacaLinear] = weakref.WeakValueDictionary()
_hook_handle = None


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    # Runs after every optimizer.step() of every optimizer: re-write the columns of the layers
    # whose active delta this optimizer owns. Keeping the write out of forward keeps forward
    # free of data-dependent guards (torch.compile) and of per-call copies.
    if not _LAYERS:
        return
    layers = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:  # every torch.optim optimizer leaves such a parameter as is
                continue
            layer = _LAYERS.get(id(param))
            if layer is not None and layer._written() and layer.delta is param:
                layers.append(layer)
    # force: fused optimizers (torch.optim.AdamW(fused=True), the HF Trainer's default
    # "adamw_torch_fused") update parameters without bumping _version.
    write_columns(layers)


def write_columns(layers: list[PacaLinear]) -> None:
    """Merged mode: writes ``W0[:, idx] + scaling * delta`` of each layer's active adapter into
    its weight, all layers in one batch (the optimizer step hook and ``paca.sync_weights``).

    One ``torch._foreach_add`` per scaling computes the columns of every layer whose weight
    has the delta's dtype (one ``torch.add`` into the weight's dtype for a bf16 or fp16
    weight), then one write per layer, under one ``no_grad``: less Python per layer than a loop
    of ``sync_weight`` calls (`paca bench --preset overhead`, where per-layer costs show).
    """
    written = [(layer, layer.active) for layer in layers if layer._written()]
    groups: dict[float, list[int]] = {}
    cols: list[torch.Tensor | None] = [None] * len(written)
    with torch.no_grad():
        for i, (_, adapter) in enumerate(written):
            base, delta = adapter.base_cols, adapter.delta
            if base.dtype == delta.dtype:
                groups.setdefault(adapter.scaling, []).append(i)
            else:
                # A bf16/fp16 weight: one kernel computes base + scaling * delta in fp32 (the
                # promoted dtype) and rounds it once into the weight's dtype, where a cast of
                # base_cols up and of the sum down cost two more per layer and step
                cols[i] = torch.add(base, delta, alpha=adapter.scaling, out=torch.empty_like(base))
        for scaling, members in groups.items():
            deltas = [written[i][1].delta for i in members]
            bases = [written[i][1].base_cols for i in members]
            for i, c in zip(members, torch._foreach_add(bases, deltas, alpha=scaling), strict=True):
                cols[i] = c  # (out, r): base + scaling * delta, one rounding as torch.add
        for (layer, adapter), c in zip(written, cols, strict=True):
            layer._write_cols(adapter.idx, c)  # write_cols_ casts to the weight's dtype
            # a plain attribute: nn.Module.__setattr__'s checks cost more than the write here
            vars(adapter)["synced_version"] = adapter.delta._version


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    # A merged layer whose delta parameter was replaced after enable (FSDP2's fully_shard turns
    # it into a DTensor; load_state_dict(assign=True) swaps it) is no longer found by the
    # post-hook above. A plain replacement is registered again; a sharded one cannot be written
    # into the weight's columns, so the step is refused before anything changes.
    stale = [
        layer
        for key, layer in list(_LAYERS.items())
        if layer.mode == "merged"
        and layer.active_adapter is not None
        and id(layer.delta) != key
        and _LAYERS.get(id(layer.delta)) is not layer
    ]
    if not stale:
        return
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for layer in stale:
        if id(layer.delta) not in owned:
            continue
        if hasattr(layer.delta, "device_mesh"):
            raise PacaError(
                f"a merged-mode PaCA layer ({layer.in_features}->{layer.out_features}) has a "
                f"sharded delta ({type(layer.delta.data).__name__}): merged mode writes the "
                "trained columns into the weight after each step and cannot do that into a "
                "sharded weight. Call paca.enable(model, mode='additive') before fully_shard "
                "(additive mode trains sharded models exactly); nothing was changed by this step"
            )
        _LAYERS[id(layer.delta)] = layer


def _install_optimizer_hook() -> None:
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = (
            register_optimizer_step_pre_hook(_before_optimizer_step),
            register_optimizer_step_post_hook(_after_optimizer_step),
        )


def columns_problem(
    idx: torch.Tensor, delta: torch.Tensor, in_features: int, out_features: int
) -> str | None:
    """What makes ``(idx, delta)`` an invalid adapter of a layer with ``in_features`` inputs and
    ``out_features`` outputs, in words; ``None`` if they are valid.

    The one definition of a valid layer adapter, used by every writer (``save_adapter``,
    ``export_lora``, ``merge``: through ``paca.model.check_finite``) and every reader (paca's
    format, PEFT's and the authors' PaCA files): ``idx`` is ``(r,)`` int64 with ``r`` distinct
    columns in ``0..in_features-1`` (a repeated column would be written twice in merged mode,
    the last value winning, and summed in additive mode: two different models), and ``delta``
    is a finite floating-point ``(out_features, r)`` tensor.

    Args:
        idx (torch.Tensor): column indices of shape ``(r,)``.
        delta (torch.Tensor): trained values of shape ``(out_features, r)``.
    """
    if idx.dtype != torch.int64 or idx.dim() != 1:
        return f"indices are {tuple(idx.shape)} {idx.dtype}, not a 1-D int64 tensor"
    r = idx.numel()
    if r == 0:
        return "indices are empty (r must be >= 1)"
    if not delta.is_floating_point() or tuple(delta.shape) != (out_features, r):
        return (
            f"delta is {tuple(delta.shape)} {delta.dtype}, not a floating-point "
            f"({out_features}, {r}) tensor"
        )
    low, high = int(idx.min()), int(idx.max())
    if low < 0 or high >= in_features:
        return f"indices fall outside 0..{in_features - 1} (found {low}..{high})"
    if idx.unique().numel() != r:
        repeated = sorted({int(i) for i in idx if int((idx == i).sum()) > 1})
        return f"indices repeat columns {repeated[:5]} (each column may appear once)"
    if not torch.isfinite(delta).all():
        return "delta holds NaN or inf"
    return None


class PacaAdapter(nn.Module):
    """One named adapter of a layer: ``delta`` ``(out, r)``, ``idx`` ``(r,)`` and, in merged
    mode, ``base_cols`` = ``W0[:, idx]`` to restore the base weight bit-exactly."""

    def __init__(self, idx: torch.Tensor, alpha: float, delta: torch.Tensor, base_cols=None):
        super().__init__()
        self.r = int(idx.numel())
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.r
        self.register_buffer("idx", idx)
        self.delta = nn.Parameter(delta)
        if base_cols is not None:
            self.register_buffer("base_cols", base_cols)
        self.synced_version = -1  # delta._version last written into the weight

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}"


class PacaLinear(nn.Module):
    """A frozen linear layer of which ``r`` input columns are trained.

    The effective weight is ``W0`` with ``W_eff[:, idx] = W0[:, idx] + scaling * delta`` for the
    active adapter. A layer holds one or more named adapters (``adapters``); one is active at
    a time (or none: the layer then computes as its base layer). ``delta``, ``idx``, ``r``,
    ``alpha`` and ``scaling`` are those of the active adapter.

    Args:
        base_layer (nn.Module): ``nn.Linear`` or transformers ``Conv1D`` (kept as a child).
        idx (torch.Tensor): int64 column indices of shape ``(r,)``.
        alpha (float): ``scaling = alpha / r``.
        mode (str): ``"merged"`` or ``"additive"``.
        adapter_name (str): name of this first adapter, made active.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        idx: torch.Tensor,
        alpha: float,
        mode: str,
        adapter_name: str = "default",
    ):
        super().__init__()
        if mode not in ("merged", "additive"):
            raise PacaError(f"mode must be 'merged' or 'additive', got {mode!r}")
        info = kinds.describe(base_layer)
        if info is None:
            raise PacaError(f"PacaLinear cannot adapt a {type(base_layer).__name__}")
        if mode == "merged" and info.merged_unsupported is not None:
            raise PacaError(
                f"mode='merged' cannot adapt this {type(base_layer).__name__}: "
                f"{info.merged_unsupported}; use mode='additive'"
            )
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = info.in_features, info.out_features
        self.transposed = info.transposed
        self.mode = mode
        # bitsandbytes' packed CPU inference kernel stays off while paca adapts the layer
        self._kernel_setting = quant.keep_training_kernel(base_layer)
        self.adapters = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._disabled = 0
        _install_optimizer_hook()
        self.add_adapter(adapter_name, idx, alpha)
        self.set_adapter(adapter_name)

    def __setstate__(self, state):
        # copy.deepcopy(model) builds layers without __init__: register the copy's deltas too.
        super().__setstate__(state)
        for adapter in self.adapters.values():
            _LAYERS[id(adapter.delta)] = self

    # -- the active adapter
    @property
    def active(self) -> PacaAdapter:
        if self.active_adapter is None:
            raise AttributeError("this PacaLinear has no active adapter")
        return self.adapters[self.active_adapter]

    @property
    def delta(self) -> nn.Parameter:
        return self.active.delta

    @property
    def idx(self) -> torch.Tensor:
        return self.active.idx

    @property
    def base_cols(self) -> torch.Tensor:
        return self.active.base_cols

    @property
    def r(self) -> int:
        return self.active.r

    @property
    def alpha(self) -> float:
        return self.active.alpha

    @property
    def scaling(self) -> float:
        return self.active.scaling

    # -- views of the base layer, so code that inspects models keeps working
    @property
    def weight(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "weight", None)

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, "
            f"active_adapter={self.active_adapter!r}"
        )

    # -- the columns inside the base weight (merged mode)
    def _read_cols(self, idx: torch.Tensor) -> torch.Tensor:
        """``W[:, idx]`` as ``(out, r)``, copied."""
        return kinds.read_cols(self.base_layer, idx)

    def base_cols_at(self, idx: torch.Tensor) -> torch.Tensor:
        """``W0[:, idx]`` as ``(out, r)`` whatever adapters the layer carries (the base weight's
        own columns, never the trained ones)."""
        return self._base_cols_at(idx.to(self.base_layer.weight.device))

    def release(self) -> nn.Module:
        """The base layer as it was before adaptation (after ``restore_base`` or ``fold``)."""
        quant.restore_kernel(self.base_layer, self._kernel_setting)
        return self.base_layer

    def _write_cols(self, idx: torch.Tensor, cols: torch.Tensor) -> None:
        """Writes ``(out, r)`` columns into the base weight at ``idx``."""
        weight = self.base_layer.weight
        write = ops.kernels(weight)["write_cols_"]
        with torch.no_grad():
            if self.transposed:
                write(weight, idx, cols.t().contiguous(), 0)
            else:
                write(weight, idx, cols, 1)

    def _written(self) -> bool:
        """Whether the weight currently holds the active adapter's columns."""
        return self.mode == "merged" and self.active_adapter is not None and not self._disabled

    def _base_cols_at(self, idx: torch.Tensor) -> torch.Tensor:
        """``W0[:, idx]``, read with the active adapter's columns taken out first."""
        if not self._written():
            return self._read_cols(idx)
        self.restore_base()
        try:
            return self._read_cols(idx)
        finally:
            self.sync_weight(force=True)

    def sync_weight(self, force: bool = False) -> None:
        """Merged mode: re-writes the trained columns if ``delta`` changed since the last write."""
        if self._written() and (force or self.delta._version != self.active.synced_version):
            write_columns([self])

    def restore_base(self) -> None:
        """Merged mode: puts ``W0[:, idx]`` of the active adapter back (bit-exact)."""
        if self.mode == "merged" and self.active_adapter is not None:
            self._write_cols(self.active.idx, self.active.base_cols)

    # -- adapters
    def add_adapter(self, name: str, idx: torch.Tensor, alpha: float) -> None:
        """Adds a named adapter (``delta`` zero, not trainable until made active)."""
        if name in self.adapters:
            raise PacaError(f"this layer already has an adapter named {name!r}")
        device = kinds.layer_device(self.base_layer)
        idx = idx.to(device=device, dtype=torch.long)
        weight = self.weight
        floating = isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point
        delta_dtype = ops.grad_dtype(weight.dtype) if floating else torch.float32
        delta = torch.zeros(self.out_features, idx.numel(), dtype=delta_dtype, device=device)
        base_cols = self._base_cols_at(idx) if self.mode == "merged" else None
        adapter = PacaAdapter(idx, alpha, delta, base_cols)
        adapter.delta.requires_grad_(False)
        self.adapters[name] = adapter
        _LAYERS[id(adapter.delta)] = self

    def set_adapter(self, name: str | None) -> None:
        """Makes ``name`` the active adapter (``None``, or a name this layer lacks: none)."""
        name = name if name in self.adapters else None
        if name == self.active_adapter:
            return
        if self._written():
            self.restore_base()
        self.active_adapter = name
        for adapter_name, adapter in self.adapters.items():
            adapter.delta.requires_grad_(adapter_name == name)
        self.sync_weight(force=True)

    def delete_adapter(self, name: str) -> None:
        if name == self.active_adapter:
            self.set_adapter(None)
        del self.adapters[name]

    # -- switching
    def disable(self) -> None:
        if self._disabled == 0:
            self.restore_base()
        self._disabled += 1

    def enable(self) -> None:
        if self._disabled == 0:
            raise PacaError("PacaLinear.enable() called more often than disable()")
        self._disabled -= 1
        if self._disabled == 0:
            self.sync_weight(force=True)

    def set_columns(
        self, idx: torch.Tensor, delta: torch.Tensor, adapter_name: str | None = None
    ) -> None:
        """Loads an adapter's columns (``idx`` ``(r,)``) and values (``delta`` ``(out, r)``)."""
        name = self.active_adapter if adapter_name is None else adapter_name
        adapter = self.adapters[name]
        if idx.shape != adapter.idx.shape or delta.shape != adapter.delta.shape:
            raise PacaError(
                f"adapter shapes idx {tuple(idx.shape)}, delta {tuple(delta.shape)} do not fit a "
                f"layer with r={adapter.r}, out_features={self.out_features}"
            )
        active = name == self.active_adapter
        with torch.no_grad():
            if active and self._written():
                self.restore_base()
            if self.mode == "merged":
                base_cols = self._read_cols(idx) if active else self._base_cols_at(idx)
                adapter.base_cols.copy_(base_cols)
            adapter.idx.copy_(idx)
            adapter.delta.copy_(delta)
        if active:
            self.sync_weight(force=True)

    def fold(self) -> None:
        """Leaves ``W0[:, idx] + scaling * delta`` of the active adapter in the base weight."""
        if self.mode == "merged":
            self.sync_weight(force=True)
        elif self.active_adapter is not None:
            adapter = self.active
            cols = (
                self._read_cols(adapter.idx).to(adapter.delta.dtype)
                + adapter.scaling * adapter.delta.detach()
            )
            self._write_cols(adapter.idx, cols.to(self.base_layer.weight.dtype))

    # -- compute
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self._disabled or self.active_adapter is None:
            return self.base_layer(x, *args, **kwargs)
        adapter = self.adapters[self.active_adapter]
        if self.mode == "additive":
            base_out = self.base_layer(x, *args, **kwargs)
            return ops.partial_linear(base_out, x, adapter.delta, adapter.idx, adapter.scaling)
        if not torch.compiler.is_compiling() and adapter.delta._version != adapter.synced_version:
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
        if not (torch.is_grad_enabled() and adapter.delta.requires_grad):
            # Inference: exactly the frozen layer, nothing gathered or saved.
            return F.linear(x, weight.t() if self.transposed else weight, bias)
        return ops.merged_linear(
            x, weight, bias, adapter.delta, adapter.idx, adapter.scaling, self.transposed
        )


class TrainedCopy(nn.Module):
    """A module trained in full beside the adapters (a classification head, say).

    Keeps the original untouched, so ``disabled``/``unload`` give back the base model, and one
    trained copy per adapter (``copies``); the active adapter's copy computes.
    """

    def __init__(self, original: nn.Module, adapter_name: str = "default"):
        super().__init__()
        self.original = original
        self.copies = nn.ModuleDict()
        self.active_adapter: str | None = None
        self._disabled = 0
        self.add_adapter(adapter_name)
        self.set_adapter(adapter_name)

    @property
    def trained(self) -> nn.Module:
        """The active adapter's copy."""
        return self.copies[self.active_adapter]

    def add_adapter(self, name: str) -> None:
        self.copies[name] = copy.deepcopy(self.original).requires_grad_(False)

    def set_adapter(self, name: str | None) -> None:
        self.active_adapter = name if name in self.copies else None
        for copy_name, module in self.copies.items():
            module.requires_grad_(copy_name == self.active_adapter)

    def delete_adapter(self, name: str) -> None:
        if name == self.active_adapter:
            self.set_adapter(None)
        del self.copies[name]

    def forward(self, *args, **kwargs):
        if self._disabled or self.active_adapter is None:
            return self.original(*args, **kwargs)
        return self.copies[self.active_adapter](*args, **kwargs)

    def disable(self) -> None:
        self._disabled += 1

    def enable(self) -> None:
        self._disabled -= 1
