"""Adapter files: round trips, RNG independence, and damaged or mismatched files."""

import json

import pytest
import torch
from conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch, train_lm
from safetensors.torch import load_file

import paca
from paca.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def trained(model_fn=tiny_llama, steps=3, **enable):
    model = paca.enable(model_fn(), **({"r": 4} | enable))
    train_lm(model, token_batch(), steps)
    return model


@pytest.mark.parametrize("mode", ["merged", "additive"])
def test_round_trip_onto_a_fresh_base_whatever_the_rng(tmp_path, mode):
    model = trained(mode=mode)
    ids = token_batch()
    expected = model(ids).logits.detach()
    paca.save_adapter(model, tmp_path / "adapter")
    tensors = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    # only delta and idx per layer: nothing of the base model
    assert len(tensors) == 2 * 14
    assert all(k.endswith((".delta", ".idx")) for k in tensors)
    assert all(tensors[k].dtype == torch.float32 for k in tensors if k.endswith("delta"))
    torch.manual_seed(12345)  # a different global RNG state must not matter
    fresh = tiny_llama()
    paca.load_adapter(fresh, tmp_path / "adapter")
    assert torch.equal(fresh(ids).logits, expected)
    assert paca.get_config(fresh).r == 4
    assert [layer.mode for _, layer in paca.paca_layers(fresh)] == [mode] * 14


def test_load_replaces_the_adapter_of_an_adapted_model(tmp_path):
    model = trained()
    ids = token_batch()
    expected = model(ids).logits.detach()
    paca.save_adapter(model, tmp_path / "a")
    other = paca.enable(tiny_llama(), r=4, seed=7)  # other columns, zero deltas
    paca.load_adapter(other, tmp_path / "a")
    assert torch.equal(other(ids).logits, expected)
    paca.unload(other)
    assert torch.equal(other(ids).logits, tiny_llama()(ids).logits), (
        "unload after load restores the base"
    )


def test_trainable_head_is_saved_and_loaded(tmp_path):
    model = paca.enable(tiny_bert_classifier(), r=4)
    with torch.no_grad():
        model.classifier.trained.weight.add_(1.0)
        for _, layer in paca.paca_layers(model):
            layer.delta.normal_()
    ids = token_batch()
    expected = model(ids).logits.detach()
    paca.save_adapter(model, tmp_path / "a")
    keys = load_file(tmp_path / "a" / ADAPTER_WEIGHTS).keys()
    assert {"classifier.weight", "classifier.bias"} <= set(keys)
    fresh = tiny_bert_classifier()
    paca.load_adapter(fresh, tmp_path / "a")
    assert torch.equal(fresh(ids).logits, expected)


def test_gpt2_round_trip(tmp_path):
    model = trained(tiny_gpt2)
    ids = token_batch()
    paca.save_adapter(model, tmp_path / "a")
    fresh = paca.load_adapter(tiny_gpt2(), tmp_path / "a")
    assert torch.equal(fresh(ids).logits, model(ids).logits)


def _expect_refusal(model, path, message):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        paca.load_adapter(model, path)
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_adapter_of_another_model_is_refused(tmp_path):
    paca.save_adapter(trained(), tmp_path / "a")
    wider = tiny_llama(hidden_size=48, intermediate_size=64)
    _expect_refusal(
        wider, tmp_path / "a", r"is \(in=32, out=32\) but the model's is \(in=48, out=48\)"
    )
    _expect_refusal(tiny_gpt2(), tmp_path / "a", "does not exist in GPT2LMHeadModel")
    adapted = paca.enable(tiny_llama(), r=2)
    _expect_refusal(adapted, tmp_path / "a", "has r=2 in the model, r=4 in")
    partial = paca.enable(tiny_llama(), r=4, target_modules=["q_proj"])
    _expect_refusal(partial, tmp_path / "a", "the layers of adapter 'default' differ")


def test_damaged_files_are_refused(tmp_path):
    paca.save_adapter(trained(), tmp_path / "a")
    weights = tmp_path / "a" / ADAPTER_WEIGHTS
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _expect_refusal(tiny_llama(), tmp_path / "a", "is corrupted or truncated")
    weights.write_bytes(b"\x00" * 16)
    _expect_refusal(tiny_llama(), tmp_path / "a", "is corrupted or truncated")
    weights.write_bytes(data)
    config = tmp_path / "a" / ADAPTER_CONFIG
    text = config.read_text()
    config.write_text(text[: len(text) // 2])
    _expect_refusal(tiny_llama(), tmp_path / "a", "is not valid JSON")
    meta = json.loads(text)
    meta["config"]["rank"] = 3
    config.write_text(json.dumps(meta))
    _expect_refusal(tiny_llama(), tmp_path / "a", r"unknown PaCA config keys \['rank'\]")
    meta = json.loads(text)
    meta["format_version"] = 99
    config.write_text(json.dumps(meta))
    _expect_refusal(tiny_llama(), tmp_path / "a", "format_version=99")
    _expect_refusal(tiny_llama(), tmp_path / "missing", "not found")


def test_tampered_tensors_are_refused(tmp_path):
    from safetensors.torch import save_file

    paca.save_adapter(trained(), tmp_path / "a")
    weights = tmp_path / "a" / ADAPTER_WEIGHTS
    tensors = load_file(weights)
    name = "model.layers.0.self_attn.q_proj"
    bad = dict(tensors)
    bad[f"{name}.idx"] = torch.tensor([0, 1, 2, 99])
    save_file(bad, weights)
    _expect_refusal(tiny_llama(), tmp_path / "a", "fall outside 0..31")
    bad = dict(tensors)
    bad["stray.tensor"] = torch.zeros(1)
    save_file(bad, weights)
    _expect_refusal(tiny_llama(), tmp_path / "a", r"unexpected tensors \['stray.tensor'\]")
    bad = dict(tensors)
    bad[f"{name}.delta"] = torch.zeros(32, 5)
    save_file(bad, weights)
    _expect_refusal(tiny_llama(), tmp_path / "a", r"has delta \(32, 5\)")


def test_saving_a_model_without_adapters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no PaCA adapters to save; call paca.enable first"):
        paca.save_adapter(tiny_llama(), tmp_path / "a")
    assert not (tmp_path / "a").exists()
