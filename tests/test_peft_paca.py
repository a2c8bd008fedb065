"""PEFT's own PaCA format (peft>=0.22), written by ``save_adapter(format="peft")``.

peft 0.22 is not installable on this machine (the registry stops at 0.21.2), so PEFT's loader
is not run here: the files are checked against the format's specification (config fields, key
names, dtypes, shapes) and read back by paca's reader of that format.
"""

import json

import pytest
import torch
from conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch, train_lm
from safetensors.torch import load_file

import paca
from paca.adapters import PEFT_WEIGHTS

SPEC_FIELDS = {
    "peft_type",
    "r",
    "paca_alpha",
    "target_modules",
    "exclude_modules",
    "layers_to_transform",
    "layers_pattern",
    "random_seed",
    "init_weights",
    "modules_to_save",
    "task_type",
    "base_model_name_or_path",
    "inference_mode",
}


def _trained(model_fn=tiny_llama, **enable):
    model = paca.enable(model_fn(), **enable)
    train_lm(model, token_batch(), 3)
    return model


def test_files_follow_the_specification(tmp_path):
    model = _trained(r=4, alpha=8, seed=3)
    paca.save_adapter(model, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert set(config) == SPEC_FIELDS
    assert config["peft_type"] == "PACA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 4 and config["paca_alpha"] == 8 and config["random_seed"] == 3
    assert config["init_weights"] is True and config["inference_mode"] is True
    assert config["modules_to_save"] is None
    layers = dict(paca.paca_layers(model))
    assert sorted(config["target_modules"]) == sorted(layers)
    tensors = load_file(str(tmp_path / "peft" / PEFT_WEIGHTS))
    expected = {f"base_model.model.{n}.paca_{k}" for n in layers for k in ("delta", "indices")}
    assert set(tensors) == expected
    for name, layer in layers.items():
        delta = tensors[f"base_model.model.{name}.paca_delta"]
        idx = tensors[f"base_model.model.{name}.paca_indices"]
        assert delta.dtype == torch.float32 and delta.shape == (layer.out_features, 4)
        assert idx.dtype == torch.int64 and idx.shape == (4,)
        assert torch.equal(delta, layer.delta.detach()) and torch.equal(idx, layer.idx)
        # the effective weight of the spec, W[:, idx] + (paca_alpha / r) * delta, is paca's
        weight = layer.base_cols_at(idx) + (config["paca_alpha"] / config["r"]) * delta
        torch.testing.assert_close(layer.weight[:, idx], weight)


def test_round_trip_gives_identical_outputs(tmp_path):
    model = _trained(r=4)
    ids = token_batch(seed=7)
    with torch.no_grad():
        want = model(ids).logits
    paca.save_adapter(model, tmp_path / "peft", format="peft")
    fresh = paca.load_adapter(tiny_llama(), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)


def test_trained_head_goes_to_modules_to_save(tmp_path):
    model = paca.enable(tiny_bert_classifier(), r=4)
    with torch.no_grad():
        model.classifier.trained.weight.add_(1.0)
    ids = token_batch()
    with torch.no_grad():
        want = model(ids).logits
    paca.save_adapter(model, tmp_path / "peft", format="peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"] and config["task_type"] == "SEQ_CLS"
    tensors = load_file(str(tmp_path / "peft" / PEFT_WEIGHTS))
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(
        tensors
    )
    fresh = paca.load_adapter(tiny_bert_classifier(), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, want)


@pytest.mark.parametrize(
    "setup, message",
    [
        ("conv1d", r"GPT-2 Conv1D layer, which PEFT's PaCA cannot adapt.*paca.export_lora"),
        ("nan", r"holds NaN or inf; refusing to save"),
        ("format", r"format='gguf' is unknown; choose one of paca, peft"),
    ],
)
def test_refusals_write_nothing(tmp_path, setup, message):
    model = paca.enable(tiny_gpt2() if setup == "conv1d" else tiny_llama(), r=4)
    if setup == "nan":
        with torch.no_grad():
            paca.paca_layers(model)[0][1].delta[0, 0] = float("nan")
    with pytest.raises(ValueError, match=message):
        paca.save_adapter(model, tmp_path / "out", format="gguf" if setup == "format" else "peft")
    assert not (tmp_path / "out").exists()


def test_cli_export_writes_the_peft_format(tmp_path, capsys):
    from paca.cli import main

    tiny_llama().save_pretrained(tmp_path / "base")
    model = _trained(r=4)
    paca.save_adapter(model, tmp_path / "adapter")
    argv = ["export", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--format", "peft", "--output", str(tmp_path / "peft")]) == 0
    assert "wrote PEFT PaCA adapter" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PACA"
    ids = token_batch(seed=5)
    fresh = paca.load_adapter(tiny_llama(), tmp_path / "peft")
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert main([*argv, "--format", "peft", "--output", str(tmp_path / "peft")]) == 2
    assert "pass --force" in capsys.readouterr().err
