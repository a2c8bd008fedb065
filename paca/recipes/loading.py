"""Loading Hugging Face models from a folder or hub id, with the right head class."""

from __future__ import annotations

from pathlib import Path

from paca.errors import PacaError


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


def load_model(name_or_path: str, adapter: str | None = None):
    """The base model from a local folder (or a hub id).

    If the adapter folder carries a ``config.json`` (``paca train`` writes one), that config
    decides the head class and its labels, so the adapter's trained head fits.
    """
    import transformers

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
        model_class = load_model_class(adapter)
        return model_class.from_pretrained(name_or_path, config=config)
    return load_model_class(name_or_path).from_pretrained(name_or_path)
