"""CPU kernels. Ops not listed here run their reference kernel from ``paca/ops.py``."""

import functools

import torch

from paca.ops import grad_dtype

DEVICE_TYPE = "cpu"
AUTO_RANK = 100  # the fallback: every accelerator comes first
HINT = None  # always available


def is_available() -> bool:
    return True


def bf16_support(device) -> tuple[bool, str]:
    # torch's own CPU feature probes (cpuinfo), not /proc/cpuinfo. Without AVX512-BF16 or AMX
    # bf16 GEMMs are emulated: 2048x576 @ 576x1536 took 2880 ms in bf16 against 22.9 ms in
    # fp32 on an AMD EPYC with AVX2 only (torch 2.13.0+cpu), while a CPU with AVX512-BF16 ran
    # it 2.3x faster in bf16 (docs/benchmarks.md, "Precision").
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return True, "this CPU has AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)():
        return True, "this CPU has AVX512-BF16"
    return False, "this CPU has neither AVX512-BF16 nor AMX, so bf16 would be emulated and slow"


@functools.cache
def _native_bf16() -> bool:
    return bf16_support(None)[0]


def partial_grad(grad_out, x_idx, scaling):
    # (x2d.T @ g2d).T is the same product as g2d.T @ x2d and faster on CPU BLAS, which streams
    # the large g2d in its own row-major order (median 0.26 ms against 0.91 ms with warm caches,
    # 0.74 against 1.19 ms cold, for out=1376, tokens=512, r=8 on 2 cores). The result is made
    # contiguous here, scaled in the same pass (torch.mul into a contiguous out), rather than by
    # autograd's gradient accumulation (two ops).
    dtype = grad_dtype(grad_out.dtype)
    g2d = grad_out.reshape(-1, grad_out.shape[-1])
    x2d = x_idx.reshape(-1, x_idx.shape[-1])
    if g2d.dtype == torch.bfloat16 and _native_bf16():
        # bf16 operands straight into the GEMM, as autocast gives any fp32 weight's gradient
        # (and PEFT's LoRA and PaCA theirs): no fp32 copy of the (tokens, out) gradient, which
        # cost as much as the product itself on an AVX512-BF16 CPU (`aten::copy_` +15 ms, mm
        # +28 ms a step on the SmolLM2 shape, issue 37's profile). The GEMM accumulates in
        # fp32; its (r, out) result is rounded to bf16 once, then scaled in fp32. Where bf16
        # is emulated (AVX2 only), the fp32 path below stays.
        product = torch.mm(x2d.to(g2d.dtype).t(), g2d)  # (r, out) in bf16
        out = product.new_empty(product.shape[::-1], dtype=dtype).copy_(product.t())
        return out.mul_(scaling)
    if g2d.dtype != dtype:
        g2d = g2d.to(dtype)
    if x2d.dtype != dtype:
        x2d = x2d.to(dtype)
    tokens, out, r = g2d.shape[0], g2d.shape[1], x2d.shape[1]
    blocks = _blocks(out)
    if blocks == 1:
        product = torch.mm(x2d.t(), g2d)  # (r, out)
        return torch.mul(product.t(), scaling, out=product.new_empty(out, r))
    # One GEMM per block of output columns, as one bmm: an r-row GEMM runs on one thread in CPU
    # BLAS, a bmm spreads its blocks over the threads. In a SmolLM2-shaped step (2 cores, fp32,
    # 210 layers) the kernels took 59 ms against 78 ms as one mm (docs/benchmarks.md).
    # Both operands are strided views (one op each: x_idx.T broadcast over the blocks, the
    # blocks of g side by side), so the split adds two ATen ops per layer, not five.
    width = out // blocks
    x_rows, x_cols = x2d.stride()
    g_rows, g_cols = g2d.stride()
    x_blocks = x2d.as_strided((blocks, r, tokens), (0, x_cols, x_rows))
    g_blocks = g2d.as_strided((blocks, tokens, width), (width * g_cols, g_rows, g_cols))
    product = torch.bmm(x_blocks, g_blocks)  # (blocks, r, width)
    result = product.new_empty(out, r)
    torch.mul(product.transpose(1, 2), scaling, out=result.view(blocks, width, r))
    return result


MIN_BLOCK = 192  # output columns per block: narrower ones ran no faster split (2 cores, fp32)


def _blocks(out: int) -> int:
    """How many blocks of output columns the fp32 ``partial_grad`` splits into: one per thread
    where each is at least ``MIN_BLOCK`` wide and they divide ``out`` evenly, else 1 (and 1
    in a ``torch.compile`` trace, which cannot ask for the thread count)."""
    if torch.compiler.is_compiling():
        return 1
    threads = torch.get_num_threads()
    if threads > 1 and out % threads == 0 and out // threads >= MIN_BLOCK:
        return threads
    return 1


KERNELS = {"partial_grad": partial_grad}
