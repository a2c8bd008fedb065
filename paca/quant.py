"""Quantized and forward-only base layers (QPaCA).

PaCA adapts these in additive mode: ``y = base_layer(x) + s * x[..., idx] @ delta.T``. The base
layer's own (quantized) kernel does the big GEMM and paca never builds the ``out x in`` weight in
floating point while training; only ``paca.merge`` dequantizes, once, to fold the columns in.

Which layers count as quantized or forward-only is ``paca.base_layer``'s to say; here are the
dequantizers (a registry, ``DEQUANTIZERS``), the conversion of a quantized layer into a plain
``nn.Linear`` for merging, and the handling of bitsandbytes' packed CPU format.

Nothing here imports bitsandbytes unless a model already uses it.
Imports: ``paca.base_layer``, ``paca.errors``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from paca.base_layer import SUPPORTED, features, layer_device
from paca.errors import PacaError, require

BITS = ("4bit", "8bit")


def _bnb():
    return sys.modules.get("bitsandbytes")


def is_bnb_4bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_bnb_8bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype a quantized layer computes in: its ``compute_dtype`` when it declares
    one (bitsandbytes 4-bit), else its bias's, else float32."""
    declared = getattr(module, "compute_dtype", None)
    if isinstance(declared, torch.dtype) and declared.is_floating_point:
        return declared
    bias = getattr(module, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.dtype.is_floating_point:
        return bias.dtype
    return torch.float32


# Dequantizers, tried in order: (name, applies(module), dequantize(module) -> (out, in) tensor).
# A new quantized layer type is one function and one register_dequantizer call.
DEQUANTIZERS: list[tuple[str, Callable[[nn.Module], bool], Callable[[nn.Module], torch.Tensor]]]
DEQUANTIZERS = []


def register_dequantizer(name: str, applies: Callable[[nn.Module], bool], first: bool = False):
    """Decorator: registers ``fn(module) -> (out, in) tensor`` for the layers ``applies`` to."""

    def register(fn):
        entry = (name, applies, fn)
        DEQUANTIZERS.insert(0, entry) if first else DEQUANTIZERS.append(entry)
        return fn

    return register


def _plain_weight(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and type(weight.data) is torch.Tensor


def _has_dequantize_method(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and callable(getattr(weight, "dequantize", None))


@register_dequantizer("bitsandbytes 4-bit", is_bnb_4bit)
def _dequantize_bnb_4bit(module: nn.Module) -> torch.Tensor:
    from bitsandbytes.functional import dequantize_4bit

    unpack_cpu_format(module)
    return dequantize_4bit(module.weight.data, module.weight.quant_state)


@register_dequantizer("bitsandbytes 8-bit", is_bnb_8bit)
def _dequantize_bnb_8bit(module: nn.Module) -> torch.Tensor:
    weight = module.weight
    if weight.dtype.is_floating_point:  # has_fp16_weights=True: not quantized
        return weight.detach()
    # int8 rows and their absmax scales; bitsandbytes moves the scales from the weight to the
    # layer's state at the first forward
    scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
    return weight.data.to(torch.float32) * (scb.to(torch.float32) / 127).unsqueeze(1)


@register_dequantizer("plain weight", _plain_weight)
def _dequantize_plain(module: nn.Module) -> torch.Tensor:
    dense = module.weight.detach()
    if not dense.dtype.is_floating_point:
        raise PacaError(
            f"cannot dequantize {type(module).__name__}: its weight is {dense.dtype} with no "
            "scales paca knows how to read; supported: " + SUPPORTED
        )
    return dense


@register_dequantizer("weight.dequantize() (torchao)", _has_dequantize_method)
def _dequantize_method(module: nn.Module) -> torch.Tensor:
    return module.weight.dequantize()


@torch.no_grad()
def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(out, in)`` weight a linear base layer computes with, in floating point.

    The first entry of ``DEQUANTIZERS`` that applies does it: bitsandbytes 4-bit and 8-bit
    weights through bitsandbytes' own functions, a weight with a ``dequantize()`` method
    (torchao) by that method. Any other forward-only layer is probed: ``W.T = layer(I) -
    layer(0)``, in blocks of rows, then checked on a random input, so a layer whose forward is
    not linear in ``x`` is refused rather than merged wrongly. Allocates the full weight: this
    is for merging, never for training.

    Raises:
        PacaError: the layer cannot be dequantized (the message says why).
    """
    fn = next((fn for _, applies, fn in DEQUANTIZERS if applies(module)), _probe)
    return fn(module).to(dtype or compute_dtype(module))


# -- bitsandbytes' packed CPU format --------------------------------------------------------------
# bitsandbytes (0.49+) converts a Linear4bit's weight in place into another layout, with its own
# kernel, the first time it runs on a CPU with AVX512-BF16 in eval mode on an input that does not
# require grad. PaCA freezes every base weight, so the first layers' inputs never require grad:
# evaluating a QPaCA model would switch those layers to other numerics (bf16 scales) than the
# ones it trains with, and the conversion fails outright on widths that are not a multiple of
# the quantization block (seen: "shape '[32, 0]' is invalid"). paca keeps an adapted layer on
# the kernel it trains with, and unpacks a layer that was packed before it was adapted.
_CPU_PACKING = "support_avx512bf16_for_cpu"


def keep_training_kernel(module: nn.Module) -> bool | None:
    """Turns bitsandbytes' packed CPU inference path off on an adapted 4-bit layer; returns the
    previous setting (``None``: the layer has no such path) for ``restore_kernel``."""
    if not is_bnb_4bit(module) or not hasattr(module, _CPU_PACKING):
        return None
    previous = bool(getattr(module, _CPU_PACKING))
    unpack_cpu_format(module)
    setattr(module, _CPU_PACKING, False)
    return previous


def restore_kernel(module: nn.Module, previous: bool | None) -> None:
    if previous is not None and hasattr(module, _CPU_PACKING):
        setattr(module, _CPU_PACKING, previous)


def unpack_cpu_format(module: nn.Module) -> None:
    """Puts a 4-bit weight that bitsandbytes packed for its CPU kernel back into its standard
    layout (what ``dequantize_4bit`` and the training kernel read)."""
    state = getattr(module.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    import bitsandbytes.functional as bnb_functional

    # bitsandbytes' own inverse, the one its Params4bit.cuda()/.xpu() call before moving
    inverse = getattr(bnb_functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise PacaError(
            f"this {type(module).__name__} holds bitsandbytes' packed CPU inference format and "
            "this bitsandbytes has no function to unpack it; adapt the model before running it "
            "in eval mode, or load it again"
        )
    module.weight.data, module.weight.quant_state = inverse(module.weight.data, state)


def _probe(module: nn.Module, block: int = 1024) -> torch.Tensor:
    shape = features(module)
    if shape is None:
        raise PacaError(
            f"cannot dequantize {type(module).__name__}: it declares no in_features/out_features; "
            "supported: " + SUPPORTED
        )
    n_in, n_out = shape
    device, dtype = layer_device(module), compute_dtype(module)
    bias = module(torch.zeros(1, n_in, device=device, dtype=dtype)).reshape(n_out)
    rows = []
    for start in range(0, n_in, block):
        eye = torch.eye(n_in, device=device, dtype=dtype)[start : start + block]
        rows.append(module(eye) - bias)
    dense = torch.cat(rows).t().contiguous()  # (out, in)
    x = torch.randn(4, n_in, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    expected = x @ dense.t() + bias
    got = module(x)
    scale = expected.abs().max().clamp_min(1e-6)
    if not torch.isfinite(got).all() or (got - expected).abs().max() / scale > 1e-2:
        raise PacaError(
            f"cannot merge into {type(module).__name__}: its forward is not linear in x (probing "
            "it with the identity does not reproduce it on a random input); save the adapter "
            "with paca.save_adapter and load it onto an unquantized model to merge"
        )
    return dense


def bias_of(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return bias.detach() if isinstance(bias, torch.Tensor) else None


def to_float_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """A plain ``nn.Linear`` computing what the (quantized) ``module`` computes, in ``dtype``
    (default: the layer's compute dtype)."""
    dtype = dtype or compute_dtype(module)
    weight = dequantize(module, dtype)
    bias = bias_of(module)
    if bias is None and not isinstance(getattr(module, "weight", None), torch.Tensor):
        # a forward-only layer: its bias is whatever it adds to a zero input
        n_in = weight.shape[1]
        with torch.no_grad():
            zero = torch.zeros(1, n_in, device=weight.device, dtype=dtype)
            bias = module(zero).reshape(-1)
        bias = bias if bias.abs().max() > 0 else None
    linear = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=dtype
    )
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias.to(dtype))
    return linear.requires_grad_(False)


def bnb_config(
    bits: str, compute_dtype: torch.dtype = torch.float32, skip: list[str] | None = None
):
    """A ``transformers.BitsAndBytesConfig`` for ``bits`` (``"4bit"``: nf4 with double
    quantization; ``"8bit"``: LLM.int8), or an error that names the extra to install."""
    if bits not in BITS:
        raise PacaError(f"quantize={bits!r}: choose one of {list(BITS)}")
    require("bitsandbytes", f"quantize={bits!r}", "quant")
    import transformers

    if bits == "4bit":
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    return transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
