"""TRL (``pip install 'paca[trl]'``): its trainers with PaCA's adapter-only checkpoints.

``SFTTrainer`` here is ``trl.SFTTrainer`` with ``paca.integrations.hf.AdapterCheckpoints``:
``save_model`` and every checkpoint hold the adapter (plus optimizer state in checkpoints),
never the full model; ``resume_from_checkpoint`` continues exactly; a bitsandbytes 4-bit or
8-bit base trains with the deltas in fp32 (TRL casts a quantized model's trainable parameters
to bf16, which suits LoRA's weights, not PaCA's deltas); gradient checkpointing and packing
work as in TRL. Any other TRL trainer: ``with_adapter_checkpoints(trl.DPOTrainer)``.

Importing this module imports trl; ``import paca`` never does.

Imports: ``trl``, ``paca.integrations.hf``.
"""

from __future__ import annotations

from paca.errors import require
from paca.integrations.hf import with_adapter_checkpoints

trl = require("trl", "paca.integrations.trl", "trl")

SFTTrainer = with_adapter_checkpoints(trl.SFTTrainer)

__all__ = ["SFTTrainer", "with_adapter_checkpoints"]
