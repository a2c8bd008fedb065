"""Apple GPU (MPS): the reference kernels of ``paca/ops.py`` serve every op.

MPS has no float64 (an fp64 model cannot be moved there, so ``grad_dtype`` gives fp32), and
``torch.mps`` has no peak-memory counter, so ``paca bench`` reports no device memory there
(``backends.device_memory`` returns ``None``). Not yet run on a Mac.
"""

import torch

DEVICE_TYPE = "mps"
AUTO_RANK = 40
HINT = "torch.backends.mps.is_available() is False (not an Apple-silicon Mac with macOS 12.3+)"


def is_available() -> bool:
    return torch.backends.mps.is_available()


KERNELS: dict = {}
