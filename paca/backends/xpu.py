"""Intel GPU (XPU) kernels: the CUDA backend's (torch code, so tests run them on CPU tensors).

Its ``partial_grad`` is one ``addmm`` in the gradient's dtype with the scaling in the GEMM's
``alpha``, which suits any GPU whose matrix units take bf16/fp16 operands. Not yet run on an
Intel GPU. Ops not listed here run their reference kernel from ``paca/ops.py``.
"""

import torch

from paca.backends.cuda import partial_grad

DEVICE_TYPE = "xpu"
AUTO_RANK = 30
HINT = "torch.xpu.is_available() is False (no Intel GPU, or a torch build without XPU support)"


def is_available() -> bool:
    xpu = getattr(torch, "xpu", None)
    return xpu is not None and xpu.is_available()


def bf16_support(device) -> tuple[bool, str]:
    native = bool(torch.xpu.is_bf16_supported())
    return native, f"torch.xpu.is_bf16_supported() is {native}"


KERNELS = {"partial_grad": partial_grad}
