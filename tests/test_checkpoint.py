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


LAYER = "model.layers.0.self_attn.q_proj"
PEFT_LAYER = f"base_model.model.{LAYER}"


def _set(key, value):
    return lambda tensors: tensors.__setitem__(key, value)


def _repeat(key):
    """The second column index made equal to the first."""

    def edit(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][1] = tensors[key][0]

    return edit


def _poke(key, at, value):
    def edit(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][at] = value

    return edit


# Broken or hostile adapter folders, one per row: (format, what is done to the weights or the
# config, the error's words). "paca" is save_adapter's format, "peft" PEFT's PaCA format (what
# save_adapter(format="peft") writes), "authors" the PaCA authors' paca_w files.
BROKEN = {
    "repeated column": ("paca", _repeat(f"{LAYER}.idx"), "indices repeat columns"),
    "column out of range": ("paca", _poke(f"{LAYER}.idx", 3, 99), r"outside 0..31 \(found"),
    "negative column": ("paca", _poke(f"{LAYER}.idx", 0, -1), r"outside 0..31 \(found -1"),
    "int32 indices": ("paca", _set(f"{LAYER}.idx", torch.arange(4, dtype=torch.int32)), "int64"),
    "2-D indices": ("paca", _set(f"{LAYER}.idx", torch.arange(4).reshape(2, 2)), r"\(2, 2\)"),
    "NaN delta": ("paca", _poke(f"{LAYER}.delta", (0, 0), float("nan")), "delta holds NaN"),
    "inf delta": ("paca", _poke(f"{LAYER}.delta", (3, 1), float("-inf")), "delta holds NaN"),
    "integer delta": (
        "paca",
        _set(f"{LAYER}.delta", torch.zeros(32, 4, dtype=torch.int32)),
        "not a floating-point",
    ),  # fmt: skip
    "delta of another r": ("paca", _set(f"{LAYER}.delta", torch.zeros(32, 5)), r"\(32, 5\)"),
    "config lies about r": ("paca", {"config": {"r": 3}}, "has 4 columns but the config says r=3"),
    "stray tensor": ("paca", _set("stray.tensor", torch.zeros(1)), r"unexpected tensors \['str"),
    "peft: repeated column": ("peft", _repeat(f"{PEFT_LAYER}.paca_indices"), "repeat columns"),
    "peft: NaN delta": ("peft", _poke(f"{PEFT_LAYER}.paca_delta", (1, 1), float("nan")), "NaN"),
    "peft: float indices": (
        "peft",
        _set(f"{PEFT_LAYER}.paca_indices", torch.tensor([0.5, 1.0, 2.0, 3.0])),
        "indices are torch.float32, not integers",
    ),  # fmt: skip
    "peft: zero alpha": ("peft", {"paca_alpha": 0}, "paca_alpha=0; a PaCA adapter needs"),
    "peft: alpha not a number": ("peft", {"paca_alpha": "16"}, "paca_alpha='16'"),
    "authors: inf columns": (
        "authors",
        _poke(f"{PEFT_LAYER}.paca_w", (0, 2), float("inf")),
        "delta holds NaN or inf",
    ),  # fmt: skip
    "authors: column out of range": (
        "authors",
        _poke(f"{PEFT_LAYER}.paca_indices", 0, 32),
        "outside 0..31",
    ),  # fmt: skip
}


def _broken_folder(tmp_path, kind, edit):
    from safetensors.torch import save_file

    model = trained()
    folder = tmp_path / "broken"
    paca.save_adapter(model, folder, format="paca" if kind == "paca" else "peft")
    weights = folder / (ADAPTER_WEIGHTS if kind == "paca" else "adapter_model.safetensors")
    tensors = load_file(weights)
    if kind == "authors":  # paca_w = (W0[:, idx] + s * delta) / s: absolute columns
        for name, layer in paca.paca_layers(model):
            w = tensors.pop(f"base_model.model.{name}.paca_delta")
            base = layer.base_cols_at(layer.idx).detach()
            tensors[f"base_model.model.{name}.paca_w"] = base / layer.scaling + w
    if isinstance(edit, dict):
        config = json.loads((folder / ADAPTER_CONFIG).read_text())
        for key, value in edit.items():
            if isinstance(value, dict):
                config[key].update(value)
            else:
                config[key] = value
        (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    else:
        edit(tensors)
    save_file(tensors, str(weights))
    return folder


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_adapter_folder_is_refused_and_the_model_kept(tmp_path, case):
    kind, edit, words = BROKEN[case]
    folder = _broken_folder(tmp_path, kind, edit)
    _expect_refusal(tiny_llama(), folder, words)  # onto a base model
    _expect_refusal(paca.enable(tiny_llama(), r=4, seed=3), folder, words)  # replacing values


@pytest.mark.parametrize("case", ["repeated column", "NaN delta", "peft: NaN delta"])
def test_export_refuses_a_broken_adapter_and_writes_nothing(tmp_path, case, capsys):
    from paca.cli import main

    kind, edit, words = BROKEN[case]
    folder = _broken_folder(tmp_path, kind, edit)
    model_dir = tmp_path / "base"
    tiny_llama().save_pretrained(model_dir)
    code = main(["export", "--model", str(model_dir), "--adapter", str(folder),
                 "--output", str(tmp_path / "out")])  # fmt: skip
    assert code == 2 and words.split(" holds")[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unsorted_columns_are_a_valid_adapter(tmp_path):
    """Each index travels with its own column of delta, so their order carries no meaning."""
    from safetensors.torch import save_file

    model = trained()
    paca.save_adapter(model, tmp_path / "a")
    weights = tmp_path / "a" / ADAPTER_WEIGHTS
    tensors = load_file(weights)
    order = torch.tensor([2, 0, 3, 1])
    tensors[f"{LAYER}.idx"] = tensors[f"{LAYER}.idx"][order].contiguous()
    tensors[f"{LAYER}.delta"] = tensors[f"{LAYER}.delta"][:, order].contiguous()
    save_file(tensors, str(weights))
    ids = token_batch()
    assert torch.equal(paca.load_adapter(tiny_llama(), tmp_path / "a")(ids).logits,
                       model(ids).logits)  # fmt: skip


def test_saving_a_model_without_adapters_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no PaCA adapters to save; call paca.enable first"):
        paca.save_adapter(tiny_llama(), tmp_path / "a")
    assert not (tmp_path / "a").exists()
