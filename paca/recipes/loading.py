"""Loading Hugging Face models from a folder or hub id, with the right head class."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from paca.errors import PacaError

if TYPE_CHECKING:
    import torch


def dtype_argument(dtype) -> dict:
    """``from_pretrained``'s keyword for the weights' dtype: ``dtype`` since transformers 4.56,
    ``torch_dtype`` before (the Gaudi images pin 4.55)."""
    import transformers
    from packaging.version import Version

    name = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {name: dtype}


def load_model_class(name_or_path: str, task: str | None = None):
    """The transformers class for a model folder: by task, else by its config's architecture."""
    import transformers

    if task == "classification":
        return transformers.AutoModelForSequenceClassification
    if task == "causal-lm":
        return transformers.AutoModelForCausalLM
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    architectures = getattr(config, "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    return model_class or transformers.AutoModel


def load_model(name_or_path: str, adapter: str | None = None, dtype=None):
    """The base model from a local folder (or a hub id), in ``dtype`` (default: the
    checkpoint's own).

    If the adapter folder carries a ``config.json`` (``paca train`` writes one), that config
    decides the head class and its labels, so the adapter's trained head fits.
    """
    import torch
    import transformers

    extra = dtype_argument(dtype) if dtype is not None else {}

    path = Path(name_or_path)
    if path.exists() and not (path / "config.json").is_file():
        raise PacaError(f"model={name_or_path}: no config.json there; pass a model folder")
    if not path.exists() and name_or_path.count("/") != 1:
        raise PacaError(f"model={name_or_path}: no such folder")
    if adapter is not None and (Path(adapter) / "config.json").is_file():
        config = transformers.AutoConfig.from_pretrained(adapter)
        # an adapter trained on a quantized base (QPaCA) merges onto the floating-point base
        # model; its config must not make transformers expect a pre-quantized checkpoint
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
        stored = stored_dtype(name_or_path)
        if dtype is None and isinstance(getattr(torch, stored or "", None), torch.dtype):
            # the base checkpoint's dtype, not the one the adapter was trained in: a bf16 run's
            # config says bfloat16, and a merge onto an fp32 base must stay fp32
            extra = dtype_argument(getattr(torch, stored))
        model_class = load_model_class(adapter)
        return model_class.from_pretrained(name_or_path, config=config, **extra)
    return load_model_class(name_or_path).from_pretrained(name_or_path, **extra)


def stored_dtype(name_or_path: str) -> str | None:
    """The dtype a local model folder's config.json stores its weights in (``"bfloat16"``...);
    ``None`` for a hub id or a folder without a readable config."""
    import json

    try:
        config = json.loads((Path(name_or_path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("dtype") or config.get("torch_dtype")


def runnable_dtype(name_or_path: str, device) -> torch.dtype | None:
    """``float32`` for a bf16 or fp16 checkpoint on a device that does not compute that dtype
    natively (a CPU without AVX512-BF16 or AMX emulates bf16: 125x slower than fp32 there,
    docs/benchmarks.md); ``None`` (keep the checkpoint's dtype) otherwise."""
    import torch

    from paca import backends

    # a hub id, or no readable config (None): let transformers decide
    if stored_dtype(name_or_path) not in ("bfloat16", "float16"):
        return None
    native, _ = backends.bf16_support(torch.device(device))
    return None if native else torch.float32
