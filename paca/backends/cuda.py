"""CUDA kernels (torch code, so the tests also run them on CPU tensors).

Ops not listed here run their reference kernel from ``paca/ops.py``.
"""

import torch

from paca.ops import grad_dtype

DEVICE_TYPE = "cuda"
AUTO_RANK = 20
HINT = "torch.cuda.is_available() is False (no GPU, or a CPU build of torch)"


def is_available() -> bool:
    return torch.cuda.is_available()


def bf16_support(device) -> tuple[bool, str]:
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 8:  # Ampere and later: bf16 tensor cores
        return True, f"this GPU (compute capability {major}.{minor}) has bf16 tensor cores"
    return False, f"this GPU (compute capability {major}.{minor}) has no bf16 tensor cores"


def partial_grad(grad_out, x_idx, scaling):
    # Tensor cores take bf16/fp16 operands and accumulate in fp32; the scaling rides in the
    # GEMM epilogue (addmm's alpha) instead of a separate multiply kernel.
    g2d = grad_out.reshape(-1, grad_out.shape[-1])
    x2d = x_idx.reshape(-1, x_idx.shape[-1]).to(g2d.dtype)
    out = g2d.new_empty((g2d.shape[1], x2d.shape[1]))
    product = torch.addmm(out, g2d.t(), x2d, beta=0, alpha=scaling)
    return product.to(grad_dtype(grad_out.dtype))


KERNELS = {"partial_grad": partial_grad}
