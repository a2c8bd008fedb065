"""Quantized and forward-only base layers (QPaCA).

PaCA adapts these in additive mode: ``y = base_layer(x) + s * x[..., idx] @ delta.T``. The base
layer's own (quantized) kernel does the big GEMM and paca never builds the ``out x in`` weight in
floating point while training; only ``paca.merge`` dequantizes, once, to fold the columns in.

Recognised base layers:

* ``nn.Linear`` and its subclasses, which covers bitsandbytes ``Linear4bit`` (nf4, fp4) and
  ``Linear8bitLt`` and torchao's quantized ``nn.Linear`` (a tensor-subclass weight).
* any other module with integer ``in_features`` and ``out_features`` (or GPTQ's
  ``infeatures``/``outfeatures``) whose forward maps ``(..., in)`` to ``(..., out)`` linearly:
  GPTQ, AWQ, HQQ-style layers. paca needs nothing else from them (no weight attribute).

Nothing here imports bitsandbytes unless a model already uses it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

# The layers paca adapts, for error messages.
SUPPORTED = (
    "nn.Linear and its subclasses (bitsandbytes Linear4bit and Linear8bitLt, torchao-quantized "
    "nn.Linear), transformers Conv1D, and any module with integer in_features/out_features "
    "whose forward maps (..., in_features) to (..., out_features) linearly (GPTQ, AWQ)"
)

BITS = ("4bit", "8bit")


def _bnb():
    return sys.modules.get("bitsandbytes")


def is_bnb_4bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def is_bnb_8bit(module: nn.Module) -> bool:
    bnb = _bnb()
    return bnb is not None and isinstance(module, bnb.nn.Linear8bitLt)


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


def layer_device(module: nn.Module) -> torch.device:
    """The device of a layer's parameters or buffers (quantized layers may hold only buffers)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


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


@torch.no_grad()
def dequantize(module: nn.Module, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The ``(out, in)`` weight a linear base layer computes with, in floating point.

    bitsandbytes 4-bit and 8-bit weights are dequantized by bitsandbytes' own functions; a weight
    with a ``dequantize()`` method (torchao) by that method; any other forward-only layer is
    probed: ``W.T = layer(I) - layer(0)``, in blocks of rows, then checked on a random input, so a
    layer whose forward is not linear in ``x`` is refused rather than merged wrongly. Allocates
    the full weight: this is for merging, never for training.
    """
    weight = getattr(module, "weight", None)
    if is_bnb_4bit(module):
        from bitsandbytes.functional import dequantize_4bit

        dense = dequantize_4bit(weight.data, weight.quant_state)
    elif is_bnb_8bit(module):
        if weight.dtype.is_floating_point:  # has_fp16_weights=True: not quantized
            dense = weight.detach()
        else:
            # int8 rows and their absmax scales; bitsandbytes moves the scales from the weight
            # to the layer's state at the first forward
            scb = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
            dense = weight.data.to(torch.float32) * (scb.to(torch.float32) / 127).unsqueeze(1)
    elif isinstance(weight, torch.Tensor) and type(weight.data) is torch.Tensor:
        dense = weight.detach()
        if not dense.dtype.is_floating_point:
            raise ValueError(
                f"cannot dequantize {type(module).__name__}: its weight is {dense.dtype} with no "
                "scales paca knows how to read; supported: " + SUPPORTED
            )
    elif isinstance(weight, torch.Tensor) and callable(getattr(weight, "dequantize", None)):
        dense = weight.dequantize()
    else:
        dense = _probe(module)
    return dense.to(dtype or compute_dtype(module))


def _probe(module: nn.Module, block: int = 1024) -> torch.Tensor:
    shape = features(module)
    if shape is None:
        raise ValueError(
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
        raise ValueError(
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
        raise ValueError(f"quantize={bits!r}: choose one of {list(BITS)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(
            f"quantize={bits!r} needs bitsandbytes, which is not installed: "
            "pip install 'paca[quant]'"
        ) from None
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
