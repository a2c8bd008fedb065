"""Intel Gaudi (HPU) kernels: static shapes only, no host syncs.

They are torch code, so the tests run them on CPU tensors; on a Gaudi they run through the
Habana PyTorch bridge (lazy or eager mode) and lower into the surrounding graph. Ops not
listed here run their reference kernel from ``paca/ops.py``.
"""

import importlib
import importlib.util
import sys

import torch

from paca.ops import grad_dtype

DEVICE_TYPE = "hpu"
AUTO_RANK = 10
HINT = (
    "habana_frameworks is not installed or sees no Gaudi (it ships only in Intel's Gaudi "
    "images, not on PyPI)"
)


def is_available() -> bool:
    # Only probe Gaudi when its plugin is installed; importing it registers torch.hpu.
    if (
        "habana_frameworks" not in sys.modules
        and importlib.util.find_spec("habana_frameworks") is None
    ):
        return False
    importlib.import_module("habana_frameworks.torch")
    return hasattr(torch, "hpu") and torch.hpu.is_available()


# Graphs are compiled per input shape (lazy mode, and eager mode's torch.compile with the
# hpu_backend): a shape that depends on the data (a boolean mask's selection) recompiles at
# every new size, so callers keep such selections off this device
STATIC_SHAPES = True


def bf16_support(device) -> tuple[bool, str]:
    return True, "Gaudi's matrix engine (MME) computes bf16 natively"


def scatter_cols(cols, idx, in_features):
    # index_add on zeros lowers to a single scatter-add node in the Gaudi graph compiler.
    out = cols.new_zeros((*cols.shape[:-1], in_features))
    return out.index_add_(-1, idx, cols)


def partial_grad(grad_out, x_idx, scaling):
    # The MME engine takes bf16 operands with fp32 accumulation; flatten with static shapes.
    g2d = grad_out.flatten(0, -2) if grad_out.dim() > 1 else grad_out.unsqueeze(0)
    x2d = x_idx.flatten(0, -2) if x_idx.dim() > 1 else x_idx.unsqueeze(0)
    product = torch.matmul(g2d.t(), x2d.to(g2d.dtype))
    return product.to(grad_dtype(grad_out.dtype)) * scaling


KERNELS = {"scatter_cols": scatter_cols, "partial_grad": partial_grad}
