"""GGUF export: the merged model (read back by transformers' own GGUF loader and compared with
a float64 reference) and the llama.cpp LoRA adapter (read back with the gguf package). That
llama.cpp itself answers as paca does is ci/serving.sh's check (llama-cpp-python, own venv)."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_gpt2, tiny_llama, token_batch

import paca
from paca.cli import main

gguf = pytest.importorskip("gguf", reason="paca[gguf] writes GGUF files")

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    """A byte-level BPE tokenizer (as SmolLM2's and GPT-2's), trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = ["Return the sum of the numbers.", "Open the file and read its lines."] * 20
    tokenizer.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    turn = "<|im_start|>{{ m['content'] }}<|im_end|>"
    fast.chat_template = "{% for m in messages %}" + turn + "{% endfor %}"
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(folder)
    return folder


def small_llama(tied=False):
    return tiny_llama(vocab_size=VOCAB, tie_word_embeddings=tied, rms_norm_eps=1e-5)


def adapted(model, seed=7, **enable):
    model = paca.enable(model, **({"r": 4, "alpha": 8} | enable))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in paca.paca_layers(model):
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=generator) * 0.05)
    return model


def float64_merged(model_fn, adapted_model):
    """The base in float64 with each layer's update W[:, idx] += scaling * delta added."""
    reference = model_fn().double()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in paca.paca_layers(adapted_model):
            adapter = layer.adapters[paca.active_adapter(adapted_model)]
            update = adapter.scaling * adapter.delta.detach().double()
            modules[name].weight[:, adapter.idx] += update
    return reference


def tensors(path):
    return {t.name: t for t in gguf.GGUFReader(str(path)).tensors}


def as_float(tensor):
    """A GGUF tensor as float32 in PyTorch's (rows, columns) order."""
    data = gguf.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape(tuple(reversed(tensor.shape.tolist())))


@pytest.mark.parametrize("tied", [False, True])
def test_merged_gguf_loads_in_transformers_and_computes_the_float64_merge(
    tmp_path, tokenizer_folder, tied
):
    from transformers import AutoModelForCausalLM

    model = adapted(small_llama(tied))
    reference = float64_merged(lambda: small_llama(tied), model)
    ids = token_batch(vocab=VOCAB)
    paca.merge(model)
    out = paca.write_gguf(model, tmp_path / "m.gguf", tokenizer_folder=tokenizer_folder)
    names = set(tensors(out))
    assert ("output.weight" in names) is not tied, "a tied head reuses token_embd"
    assert {"blk.1.attn_q.weight", "blk.1.ffn_down.weight", "output_norm.weight"} <= names
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    assert loaded.config.num_key_value_heads == 2 and loaded.config.vocab_size == VOCAB
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(ids).logits.double(), reference(ids).logits, rtol=1e-5, atol=1e-5
        )


def test_tokenizer_and_chat_template_go_in(tmp_path, tokenizer_folder):
    from transformers import AutoTokenizer

    out = paca.write_gguf(small_llama(), tmp_path / "m.gguf", tokenizer_folder=tokenizer_folder)
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == VOCAB
    assert fields["tokenizer.ggml.merges"].contents(), "a BPE tokenizer needs its merges"
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    original = AutoTokenizer.from_pretrained(tokenizer_folder)
    assert fields["tokenizer.ggml.eos_token_id"].contents() == original.eos_token_id
    # transformers reads the tokenizer back from the GGUF and splits text the same way
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    text = "Return the lines of the file."
    assert back(text)["input_ids"][-7:] == original(text)["input_ids"][-7:]


def test_copies_the_tokenizer_of_a_base_gguf(tmp_path, tokenizer_folder):
    first = paca.write_gguf(small_llama(), tmp_path / "a.gguf", tokenizer_folder=tokenizer_folder)
    second = paca.write_gguf(small_llama(), tmp_path / "b.gguf", tokenizer_from=first)
    a, b = (gguf.GGUFReader(str(p)).fields for p in (first, second))
    keys = sorted(k for k in a if k.startswith("tokenizer."))
    assert keys == sorted(k for k in b if k.startswith("tokenizer."))
    for key in keys:
        assert a[key].contents() == b[key].contents(), key
    with pytest.raises(paca.PacaError, match="holds no tokenizer"):
        lora = tmp_path / "lora.gguf"
        paca.export_gguf_lora(adapted(small_llama()), lora)
        paca.write_gguf(small_llama(), tmp_path / "c.gguf", tokenizer_from=lora)
    assert not (tmp_path / "c.gguf").exists()
    padded = tiny_llama(vocab_size=VOCAB + 4)  # an embedding padded past the tokenizer
    with pytest.raises(paca.PacaError, match=f"has {VOCAB} tokens, the model's vocabulary"):
        paca.write_gguf(padded, tmp_path / "c.gguf", tokenizer_from=first)
    assert not (tmp_path / "c.gguf").exists()
    out = paca.write_gguf(padded, tmp_path / "c.gguf", tokenizer_folder=tokenizer_folder)
    tokens = gguf.GGUFReader(str(out)).fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == VOCAB + 4 and tokens[-1] == f"[PAD{VOCAB + 3}]"


@pytest.mark.parametrize(
    "kind, ggml, tolerance",
    [("f16", "F16", 1e-3), ("bf16", "BF16", 1e-2), ("q8_0", "Q8_0", 1e-2)],
)
def test_smaller_types(tmp_path, tokenizer_folder, kind, ggml, tolerance):
    model = small_llama()
    full = tensors(paca.write_gguf(model, tmp_path / "f32.gguf", tokenizer_folder=tokenizer_folder))
    out = paca.write_gguf(
        model, tmp_path / f"{kind}.gguf", tokenizer_folder=tokenizer_folder, gguf_type=kind
    )
    small = tensors(out)
    assert small["blk.0.attn_norm.weight"].tensor_type.name == "F32", "norms stay F32"
    assert small["blk.0.ffn_up.weight"].tensor_type.name == ggml
    for name, tensor in small.items():
        exact = as_float(full[name])
        scale = np.abs(exact).max()
        assert np.abs(as_float(tensor) - exact).max() <= tolerance * scale, name
    file_type = gguf.GGUFReader(str(out)).fields["general.file_type"].contents()
    assert file_type == getattr(gguf.LlamaFileType, f"MOSTLY_{ggml}")


def test_lora_gguf_is_the_paca_update_in_llama_cpp_layout(tmp_path, tokenizer_folder):
    model = adapted(small_llama())
    out = paca.export_gguf_lora(model, tmp_path / "lora.gguf")
    fields = gguf.GGUFReader(str(out)).fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 4.0, "alpha = r: llama.cpp's scale is 1"
    assert fields["general.architecture"].contents() == "llama"
    lora = tensors(out)
    assert len(lora) == 2 * len(paca.paca_layers(model))
    # the base and the merged model written in llama.cpp's layout: merged = base + B @ A
    base = tensors(paca.write_gguf(small_llama(), tmp_path / "b.gguf", tokenizer_from=None,
                                   tokenizer_folder=tokenizer_folder))  # fmt: skip
    paca.merge(model)
    merged = tensors(paca.write_gguf(model, tmp_path / "m.gguf", tokenizer_folder=tokenizer_folder))
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.1.ffn_down.weight"):
        down, up = as_float(lora[f"{name}.lora_a"]), as_float(lora[f"{name}.lora_b"])
        assert down.shape[0] == 4 and up.shape[1] == 4
        np.testing.assert_allclose(
            as_float(merged[name]), as_float(base[name]) + up @ down, rtol=1e-5, atol=1e-6
        )


def test_refusals_write_nothing(tmp_path, tokenizer_folder):
    target = tmp_path / "x.gguf"
    with pytest.raises(paca.PacaError, match=r"model_type='gpt2'.*convert_hf_to_gguf"):
        paca.write_gguf(tiny_gpt2(), target, tokenizer_folder=tokenizer_folder)
    with pytest.raises(paca.PacaError, match="still has PaCA layers; merge the adapter first"):
        paca.write_gguf(adapted(small_llama()), target, tokenizer_folder=tokenizer_folder)
    with pytest.raises(paca.PacaError, match="gguf_type='q4_k'"):
        paca.write_gguf(small_llama(), target, tokenizer_folder=tokenizer_folder, gguf_type="q4_k")
    with pytest.raises(paca.PacaError, match=r"name the file \*\.gguf"):
        paca.write_gguf(small_llama(), tmp_path / "x.bin", tokenizer_folder=tokenizer_folder)
    with pytest.raises(paca.PacaError, match="rope scaling 'linear'"):
        scaled = tiny_llama(vocab_size=VOCAB, rope_scaling={"rope_type": "linear", "factor": 2.0})
        paca.write_gguf(scaled, target, tokenizer_folder=tokenizer_folder)
    with pytest.raises(paca.PacaError, match="no tokenizer the gguf package reads"):
        paca.write_gguf(small_llama(), target, tokenizer_folder=tmp_path)
    quantized = small_llama()  # an integer weight, as a quantized layer keeps it
    layer = quantized.model.layers[0].mlp.up_proj
    layer.weight = torch.nn.Parameter(layer.weight.to(torch.int8), requires_grad=False)
    with pytest.raises(paca.PacaError, match=r"up_proj is quantized .*floating-point base"):
        paca.write_gguf(quantized, target, tokenizer_folder=tokenizer_folder)
    trained = adapted(small_llama(), trainable_modules=["lm_head"])
    with pytest.raises(paca.PacaError, match=r"lm_head were trained in full.*--format gguf"):
        paca.export_gguf_lora(trained, target)
    with pytest.raises(paca.PacaError, match="gguf_type='q8_0'"):
        paca.export_gguf_lora(adapted(small_llama()), target, gguf_type="q8_0")
    assert list(tmp_path.iterdir()) == []
    paca.export_gguf_lora(adapted(small_llama()), target)
    before = target.read_bytes()
    with pytest.raises(paca.PacaError, match="exists; choose another output or pass force=True"):
        paca.export_gguf_lora(adapted(small_llama(), seed=8), target)
    assert target.read_bytes() == before
    paca.export_gguf_lora(adapted(small_llama(), seed=8), target, force=True)
    assert target.read_bytes() != before
    assert [p.name for p in tmp_path.iterdir()] == ["x.gguf"], "no temporary file left"
    mask = os.umask(0o022)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask, "readable as open() would make it"


def test_cli_export_gguf_and_gguf_lora(tmp_path, tokenizer_folder, capsys):
    from transformers import AutoTokenizer

    small_llama().save_pretrained(tmp_path / "base")
    AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(tmp_path / "base")
    model = adapted(small_llama())
    paca.save_adapter(model, tmp_path / "adapter")
    argv = ["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    out = tmp_path / "merged.gguf"
    assert main([*argv, "--format", "gguf", "--gguf-type", "q8_0", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"llama-server -m {out}" in printed and "ollama create" in printed
    assert tensors(out)["blk.0.attn_v.weight"].tensor_type.name == "Q8_0"
    lora = tmp_path / "lora.gguf"
    assert main([*argv, "--format", "gguf-lora", "--output", str(lora)]) == 0
    assert f"--lora {lora}" in capsys.readouterr().out
    assert main([*argv, "--format", "gguf-lora", "--output", str(lora)]) == 2
    assert "exists" in capsys.readouterr().err
    other = str(tmp_path / "other.gguf")
    assert main([*argv, "--format", "gguf-lora", "--gguf-type", "q8_0", "--output", other]) == 2
    assert "--gguf-type 'q8_0'; use one of f32, f16, bf16" in capsys.readouterr().err
    assert main([*argv, "--gguf-type", "q8_0", "--output", str(tmp_path / "peft-lora")]) == 2
    assert "apply to the GGUF formats" in capsys.readouterr().err
    assert not Path(other).exists() and not (tmp_path / "peft-lora").exists()
    gpt2 = tmp_path / "gpt2"
    tiny_gpt2().save_pretrained(gpt2)
    paca.save_adapter(adapted(tiny_gpt2()), tmp_path / "gpt2-adapter")
    bad = ["export", "--model", str(gpt2), "--adapter", str(tmp_path / "gpt2-adapter")]
    assert main([*bad, "--format", "gguf", "--output", str(tmp_path / "g.gguf")]) == 2
    err = capsys.readouterr().err
    assert "model_type='gpt2'" in err and "Traceback" not in err
    assert not (tmp_path / "g.gguf").exists()
