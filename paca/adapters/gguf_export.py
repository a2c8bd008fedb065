"""Export to GGUF, the file format of llama.cpp (and of Ollama and LM Studio, built on it).

Two outputs:

- ``write_gguf``: a whole model (merge the adapter first: ``paca.merge``) as one GGUF file,
  with its tokenizer and chat template inside, in F32, F16, BF16 or Q8_0 (quantized by the
  ``gguf`` package's own quantizer).
- ``export_gguf_lora``: a PaCA adapter as a llama.cpp LoRA adapter (``llama-cli --lora``,
  ``Llama(lora_path=...)``), to apply on top of a GGUF of the base model the user already has,
  quantized or not. The update is exactly PaCA's, as in ``export_lora``: ``A`` selects the
  ``r`` trained columns (one-hot rows) and ``B = scaling * delta``; ``adapter.lora.alpha = r``
  makes llama.cpp's scale (alpha / r) 1.

The LLaMA family (``model_type`` llama or mistral) is what llama.cpp runs as architecture
``llama``: tied or untied output head, the seven projections. llama.cpp keeps each head's
query and key rows in the order of its rotary kernel (the two halves of a head interleaved),
not Hugging Face's (one half, then the other), so those rows are reordered on the way out, and
a LoRA ``B`` of ``q_proj``/``k_proj`` likewise.

The tokenizer comes from a GGUF of the same base when one is given (``tokenizer_from``: every
``tokenizer.*`` field copied as it is, pre-tokenizer name included), else from the model
folder's tokenizer files through the ``gguf`` package's readers (byte-level BPE, or
SentencePiece-style); llama.cpp then splits text with its default pre-tokenizer, which for some
inputs tokenizes differently from transformers (token ids passed in are unaffected).

Imports: ``paca.model``, ``paca.adapters.common``, ``paca.errors``; ``gguf`` (``paca[gguf]``)
when called.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from paca.adapters.common import atomic_file
from paca.adapters.lora import column_selector
from paca.errors import PacaError, require
from paca.model import adapter_copies, adapter_layers, check_finite, paca_layers, resolve_adapter

logger = logging.getLogger("paca")

# what llama.cpp's architecture "llama" runs
LLAMA_FAMILY = ("llama", "mistral")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
LORA_GGUF_TYPES = ("f32", "f16", "bf16")
# Hugging Face module name (the last two parts) -> GGUF tensor name inside a block
_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_TENSORS = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
}


def require_gguf():
    """The ``gguf`` package, else MissingDependency naming ``paca[gguf]``."""
    return require("gguf", "GGUF export", extra="gguf")


def _llama_config(model: nn.Module):
    """The model's config if llama.cpp runs it as ``llama``; else a PacaError with the fix."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    what = type(model).__name__
    if kind not in LLAMA_FAMILY:
        raise PacaError(
            f"GGUF export writes the LLaMA family ({', '.join(LLAMA_FAMILY)}); this model "
            f"({what}) is model_type={kind!r}. Write the merged model with `paca merge` and "
            "convert it with llama.cpp's convert_hf_to_gguf.py, which knows more architectures"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(config, flag, False):
            raise PacaError(
                f"GGUF export: {what} has {flag}=True, which llama.cpp's llama architecture "
                "does not load here; convert the merged model (paca merge) with llama.cpp's "
                "convert_hf_to_gguf.py"
            )
    scaling = getattr(config, "rope_scaling", None) or {}
    kind_of_scaling = scaling.get("rope_type", scaling.get("type", "default"))
    if kind_of_scaling not in (None, "default"):
        raise PacaError(
            f"GGUF export: {what} uses rope scaling {kind_of_scaling!r}, which this exporter "
            "does not write; convert the merged model (paca merge) with llama.cpp's "
            "convert_hf_to_gguf.py"
        )
    return config


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:  # transformers 5 keeps it in rope_parameters
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The rows of a query or key projection (``heads`` heads) in llama.cpp's order: within
    each head, row ``i`` of the first half and row ``i`` of the second half become rows ``2i``
    and ``2i + 1``."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _llama_cpp_rows(target: str, rows: torch.Tensor, config) -> torch.Tensor:
    """``rows`` (a weight, or a LoRA ``B``) of GGUF tensor ``target`` in llama.cpp's order."""
    heads = int(config.num_attention_heads)
    if target.endswith(".attn_q"):
        return _rotary_rows(rows, heads)
    if target.endswith(".attn_k"):
        return _rotary_rows(rows, int(getattr(config, "num_key_value_heads", None) or heads))
    return rows


def _gguf_name(hf_name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q``; None for what GGUF does not
    hold (rotary caches)."""
    if hf_name in _TOP_TENSORS:
        return _TOP_TENSORS[hf_name]
    parts = hf_name.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit():
        inner = _BLOCK_TENSORS.get(".".join(parts[3:]))
        if inner is not None:
            return f"blk.{parts[2]}.{inner}"
    return None


def _check_plain(model: nn.Module, what: str) -> None:
    """Refuses a model that still has adapters or quantized layers (their weights are not
    plain floating-point tensors)."""
    if paca_layers(model):
        raise PacaError(
            f"{what}: the model still has PaCA layers; merge the adapter first (paca.merge) or "
            "write it as a LoRA adapter GGUF (export_gguf_lora)"
        )
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and not weight.is_floating_point():
            raise PacaError(
                f"{what}: {name} is quantized ({type(module).__name__}, {weight.dtype}); load "
                "the floating-point base model (the adapter merges onto it) and export that"
            )


def _tensor_type(gguf, name: str, array, gguf_type: str):
    """``(data, raw_dtype)`` for one tensor: 1-D tensors (norms) stay F32; Q8_0 where rows
    divide into its blocks of 32, else F16."""
    import numpy as np

    if array.ndim == 1 or gguf_type == "f32":
        return array.astype(np.float32, copy=False), None
    if gguf_type == "f16":
        return array.astype(np.float16), None
    kind = gguf.GGMLQuantizationType.BF16 if gguf_type == "bf16" else gguf.GGMLQuantizationType.Q8_0
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if array.shape[-1] % block:
        logger.warning("paca: %s has rows of %d, not a multiple of %d: written as F16",
                       name, array.shape[-1], block)  # fmt: skip
        return array.astype(np.float16), None
    return gguf.quantize(array.astype(np.float32, copy=False), kind), kind


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def check_type(gguf_type: str, allowed: tuple[str, ...], what: str) -> None:
    if gguf_type not in allowed:
        raise PacaError(f"{what}: gguf_type={gguf_type!r}; use one of {', '.join(allowed)}")


def _add_model_fields(writer, config, name: str) -> None:
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    writer.add_head_count_kv(int(kv_heads))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))


def _copy_tokenizer(gguf, writer, source: Path, vocab_size: int) -> None:
    """Every ``tokenizer.*`` field of the GGUF ``source``, as it is."""
    reader = gguf.GGUFReader(str(source))
    fields = [f for k, f in reader.fields.items() if k.startswith("tokenizer.")]
    tokens = next((f for f in fields if f.name == "tokenizer.ggml.tokens"), None)
    if tokens is None:
        raise PacaError(f"tokenizer_from={source}: this GGUF holds no tokenizer")
    if len(tokens.data) != vocab_size:  # llama.cpp refuses a file whose counts differ
        raise PacaError(
            f"tokenizer_from={source} has {len(tokens.data)} tokens, the model's vocabulary "
            f"{vocab_size}: pass a GGUF of this model's base"
        )
    for field in fields:
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, field.contents())
        else:
            writer.add_key_value(field.name, field.contents(), kind)


def _add_tokenizer(gguf, writer, folder: Path, vocab_size: int) -> None:
    """The tokenizer of a transformers folder, through the gguf package's readers."""
    vocab = None
    for reader in (gguf.vocab.BpeVocab, gguf.vocab.LlamaHfVocab):
        try:
            vocab = reader(folder)
            break
        except (FileNotFoundError, TypeError, ValueError):
            continue
    if vocab is None:
        raise PacaError(
            f"GGUF export: no tokenizer the gguf package reads in {folder} (byte-level BPE or "
            "SentencePiece-style tokenizer.json); pass tokenizer_from=<a GGUF of this base>"
        )
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    # an embedding padded past the tokenizer (common) gets placeholder tokens: llama.cpp wants
    # one token per embedding row
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    if len(tokens) > vocab_size:
        raise PacaError(
            f"GGUF export: {folder}'s tokenizer has {len(tokens)} tokens, more than the "
            f"model's vocabulary ({vocab_size}); pass the folder of this model's tokenizer"
        )
    writer.add_tokenizer_model(vocab.tokenizer_model)
    if vocab.tokenizer_model == "gpt2":
        writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=vocab.tokenizer_model == "gpt2")
    special.add_to_gguf(writer, quiet=True)
    logger.warning(
        "paca: the GGUF's tokenizer comes from %s's files: llama.cpp splits text with its "
        "default pre-tokenizer, which can differ from transformers' on some inputs; pass "
        "tokenizer_from=<a GGUF of this base> (paca export --gguf-base) to copy its tokenizer",
        folder,
    )


def _write(gguf, path: Path, force: bool, fill) -> Path:
    """One atomic write of a GGUF file: ``fill(writer)`` adds fields and tensors."""
    if path.exists() and not force:
        raise PacaError(f"{path} exists; choose another output or pass force=True")
    if path.suffix != ".gguf":
        raise PacaError(f"output={path}: name the file *.gguf (llama.cpp and Ollama expect it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as staging:
        writer = gguf.GGUFWriter(str(staging), "llama")
        fill(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def write_gguf(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer_folder: str | os.PathLike | None = None,
    tokenizer_from: str | os.PathLike | None = None,
    gguf_type: str = "f32",
    force: bool = False,
) -> Path:
    """Writes a LLaMA-family causal LM (plain layers: merge an adapter first) as one GGUF file.

    Args:
        model (nn.Module): e.g. ``paca.merge(model)`` of a ``LlamaForCausalLM``.
        path: the ``.gguf`` file to write.
        tokenizer_folder: the transformers folder whose tokenizer files go in.
        tokenizer_from: a GGUF of the same base model whose ``tokenizer.*`` fields are copied
            instead (the exact pre-tokenizer llama.cpp needs; preferred when there is one).
        gguf_type (str): ``f32``, ``f16``, ``bf16`` or ``q8_0`` for the matrices (norms stay
            F32).
        force (bool): replace an existing file.

    Raises:
        PacaError: not the LLaMA family, adapters or quantized layers still in it, no
            tokenizer, an unknown type, or the file exists; nothing is written then.
    """
    gguf = require_gguf()
    path = Path(path)
    check_type(gguf_type, GGUF_TYPES, "GGUF export")
    config = _llama_config(model)
    _check_plain(model, "GGUF export")
    if tokenizer_from is None and tokenizer_folder is None:
        raise PacaError("GGUF export needs a tokenizer: pass tokenizer_folder or tokenizer_from")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    tensors = []
    for name, tensor in model.state_dict().items():
        module, _, kind = name.rpartition(".")
        target = _gguf_name(module)
        if kind != "weight" or target is None:
            if "rotary" not in name:
                raise PacaError(f"GGUF export: no GGUF name for {name} of {type(model).__name__}")
            continue
        if target == "output" and tied:
            continue  # llama.cpp reuses token_embd
        weight = _llama_cpp_rows(target, tensor.detach().to("cpu", torch.float32), config)
        tensors.append((f"{target}.weight", weight.numpy()))

    def fill(writer):
        _add_model_fields(writer, config, getattr(config, "_name_or_path", "") or "paca-merged")
        writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[gguf_type]))
        if tokenizer_from is not None:
            _copy_tokenizer(gguf, writer, Path(tokenizer_from), int(config.vocab_size))
        else:
            _add_tokenizer(gguf, writer, Path(tokenizer_folder), int(config.vocab_size))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, array in tensors:
            data, raw = _tensor_type(gguf, name, array, gguf_type)
            writer.add_tensor(name, data, raw_dtype=raw)

    return _write(gguf, path, force, fill)


def export_gguf_lora(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    gguf_type: str = "f32",
    force: bool = False,
) -> Path:
    """Writes one PaCA adapter of a LLaMA-family model as a llama.cpp LoRA adapter GGUF.

    Apply it to any GGUF of the same base (``llama-cli -m base.gguf --lora adapter.gguf``,
    ``Llama(model_path=..., lora_path=...)``); on an F32 base it computes what the PaCA model
    computes, up to float rounding.

    Raises:
        PacaError: not the LLaMA family, NaN/inf in the adapter, layers of different ``r``,
            modules trained in full (a LoRA GGUF cannot carry them: export the merged model),
            an unknown type, or the file exists; nothing is written then.
    """
    gguf = require_gguf()
    path = Path(path)
    check_type(gguf_type, LORA_GGUF_TYPES, "GGUF LoRA export")
    adapter_name = resolve_adapter(model, adapter_name, "export")
    config = _llama_config(model)
    check_finite(model, adapter_name, "export")
    trained = [n for n, _ in adapter_copies(model, adapter_name)]
    if trained:
        raise PacaError(
            f"GGUF LoRA export: {', '.join(trained)} were trained in full, which a LoRA GGUF "
            "cannot carry; export the merged model instead (paca export --format gguf)"
        )
    tensors, ranks = [], set()
    for name, layer, adapter in adapter_layers(model, adapter_name):
        target = _gguf_name(name)
        if target is None or layer.transposed:
            raise PacaError(f"GGUF LoRA export: no llama.cpp tensor for the adapted layer {name}")
        ranks.add(adapter.r)
        up = (adapter.scaling * adapter.delta.detach()).to("cpu", torch.float32)
        up = _llama_cpp_rows(target, up, config)
        down = column_selector(adapter.r, layer.in_features, adapter.idx, torch.float32)
        tensors.append((f"{target}.weight.lora_a", down.numpy()))
        tensors.append((f"{target}.weight.lora_b", up.numpy()))
    if len(ranks) != 1:
        raise PacaError(
            f"GGUF LoRA export: layers have ranks {sorted(ranks)}; llama.cpp scales every layer by "
            "one alpha / r, so export the merged model (paca export --format gguf) instead"
        )

    def fill(writer):
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(ranks.pop()))
        for name, array in tensors:
            data, raw = _tensor_type(gguf, name, array, gguf_type)
            writer.add_tensor(name, data, raw_dtype=raw)

    return _write(gguf, path, force, fill)
