"""CUDA kernels (torch code, so the tests also run them on CPU tensors)."""

import torch

from paca.ops import grad_dtype


def gather_cols(x, idx):
    return torch.index_select(x, -1, idx)


def scatter_cols(cols, idx, in_features):
    out = cols.new_zeros((*cols.shape[:-1], in_features))
    return out.index_copy_(-1, idx, cols)


def write_cols_(weight, idx, cols, dim):
    weight.index_copy_(dim, idx, cols.to(weight.dtype))


def partial_grad(grad_out, x_idx, scaling):
    # Tensor cores take bf16/fp16 operands and accumulate in fp32; scale in the GEMM epilogue
    # (addmm's alpha) instead of launching a separate multiply.
    g2d = grad_out.reshape(-1, grad_out.shape[-1])
    x2d = x_idx.reshape(-1, x_idx.shape[-1]).to(g2d.dtype)
    out = g2d.new_empty((g2d.shape[1], x2d.shape[1]))
    product = torch.addmm(out, g2d.t(), x2d, beta=0, alpha=scaling)
    return product.to(grad_dtype(grad_out.dtype))


KERNELS = {
    "gather_cols": gather_cols,
    "scatter_cols": scatter_cols,
    "write_cols_": write_cols_,
    "partial_grad": partial_grad,
}
