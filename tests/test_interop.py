"""Export to PEFT LoRA (checked by loading it with peft) and reading other PaCA formats."""

import json
import logging

import pytest
import torch
from conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch
from safetensors.torch import load_file, save_file

import paca
from paca.cli import main

peft = pytest.importorskip("peft", reason="peft (the dev extra) checks the exported LoRA adapters")


def adapted(model_fn, **enable):
    model = paca.enable(model_fn(), **({"r": 4, "alpha": 8} | enable))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _, layer in paca.paca_layers(model):
            layer.delta.copy_(torch.randn(layer.delta.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2, tiny_bert_classifier])
def test_exported_lora_reproduces_the_paca_model_in_peft(tmp_path, model_fn):
    model = adapted(model_fn)
    if model_fn is tiny_bert_classifier:
        with torch.no_grad():
            model.classifier.trained.weight.add_(0.5)  # a trained head travels as modules_to_save
    ids = token_batch()
    expected = model(ids).logits.detach()
    out = paca.export_lora(model, tmp_path / "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4
    assert config["fan_in_fan_out"] == (model_fn is tiny_gpt2)
    tensors = load_file(out / "adapter_model.safetensors")
    a = next(v for k, v in tensors.items() if k.endswith("lora_A.weight"))
    assert (
        a.dtype == torch.float32
        and torch.equal(a.sum(1), torch.ones(4))
        and set(a.unique().tolist()) == {0.0, 1.0}
    )
    lora = peft.PeftModel.from_pretrained(model_fn(), out).eval()
    torch.testing.assert_close(lora(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_export_refusals_write_nothing(tmp_path):
    with pytest.raises(ValueError, match="no PaCA adapters to export; call paca.enable first"):
        paca.export_lora(tiny_llama(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    model = adapted(tiny_llama)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="exists; choose another output or pass force=True"):
        paca.export_lora(model, tmp_path / "taken")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    paca.export_lora(model, tmp_path / "taken", force=True)
    assert sorted(p.name for p in (tmp_path / "taken").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging folder left"


def _write_foreign(model, path, original: bool, shuffle: bool = True):
    """A PaCA adapter as the PEFT branch (paca_delta) or the authors' code (paca_w) store it."""
    path.mkdir()
    tensors = {}
    for name, layer in paca.paca_layers(model):
        idx, delta = layer.idx.clone(), layer.delta.detach().clone()
        if shuffle:  # those formats keep randperm order; paca sorts on load
            order = torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(1))
            idx, delta = idx[order], delta[:, order]
        if original:
            w0 = layer.base_layer.weight.detach()
            w0 = w0.t() if layer.transposed else w0
            if layer.mode == "merged":
                w0 = w0.clone().index_copy_(1, layer.idx, layer.base_cols)
            values = (w0[:, idx] + layer.scaling * delta) / layer.scaling
            tensors[f"base_model.model.{name}.paca_w"] = values.contiguous()
        else:
            tensors[f"base_model.model.{name}.paca_delta"] = delta.contiguous()
        tensors[f"base_model.model.{name}.paca_indices"] = idx
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {
        "peft_type": "PACA",
        "r": 4,
        "paca_alpha": 8,
        "target_modules": ["q_proj"],
        "base_model_name_or_path": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("model_fn", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("original", [False, True])
def test_reads_the_peft_branch_and_the_authors_formats(tmp_path, caplog, model_fn, original):
    model = adapted(model_fn)
    ids = token_batch()
    expected = model(ids).logits.detach()
    _write_foreign(model, tmp_path / "foreign", original)
    with caplog.at_level(logging.WARNING, logger="paca"):
        fresh = paca.load_adapter(model_fn(), tmp_path / "foreign")
    kind = "authors' format" if original else "PEFT PaCA branch format"
    assert kind in caplog.text and "r=4, alpha=8" in caplog.text
    assert paca.get_config(fresh).alpha == 8.0 and paca.get_config(fresh).r == 4
    if original:  # delta = paca_w - W0[:, idx] / s: rounding of the subtraction
        torch.testing.assert_close(fresh(ids).logits, expected, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(fresh(ids).logits, expected)
    # converted once, it saves and reloads as paca's own format
    paca.save_adapter(fresh, tmp_path / "native")
    assert torch.equal(
        paca.load_adapter(model_fn(), tmp_path / "native")(ids).logits, fresh(ids).logits
    )


def test_foreign_files_from_another_model_or_damaged_are_refused(tmp_path):
    _write_foreign(adapted(tiny_llama), tmp_path / "f", original=False)
    with pytest.raises(ValueError, match="does not exist in GPT2LMHeadModel"):
        paca.load_adapter(tiny_gpt2(), tmp_path / "f")
    wider = tiny_llama(hidden_size=48, intermediate_size=64)
    with pytest.raises(ValueError, match=r"expected \(4,\) and \(48, 4\)"):
        paca.load_adapter(wider, tmp_path / "f")
    weights = tmp_path / "f" / "adapter_model.safetensors"
    tensors = load_file(weights)
    tensors["base_model.model.lm_head.weight"] = torch.zeros(1)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match="unexpected tensor 'base_model.model.lm_head.weight'"):
        paca.load_adapter(tiny_llama(), tmp_path / "f")
    weights.write_bytes(b"\x00" * 10)
    model = tiny_llama()
    with pytest.raises(ValueError, match="corrupted or truncated"):
        paca.load_adapter(model, tmp_path / "f")
    assert not paca.paca_layers(model)


def test_cli_export_lora(tmp_path, capsys):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    model = adapted(tiny_llama)
    ids = token_batch()
    expected = model(ids).logits.detach()
    paca.save_adapter(model, tmp_path / "adapter")
    argv = [
        "export-lora",
        "--model",
        str(tmp_path / "base"),
        "--adapter",
        str(tmp_path / "adapter"),
    ]
    assert main([*argv, "--output", str(tmp_path / "lora")]) == 0
    printed = capsys.readouterr().out
    assert "wrote LoRA adapter" in printed
    assert "--enable-lora --max-lora-rank 8 --lora-target-modules down_proj" in printed
    lora = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    torch.testing.assert_close(lora(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert main([*argv, "--output", str(tmp_path / "lora")]) == 2
    assert "exists; choose another folder or pass --force" in capsys.readouterr().err
    assert main([*argv, "--output", str(tmp_path / "lora"), "--force"]) == 0
    bad = ["export-lora", "--model", str(tmp_path / "base"), "--adapter", str(tmp_path / "none")]
    assert main([*bad, "--output", str(tmp_path / "o")]) == 2
    assert "--adapter" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_cli_export_lora_refuses_an_adapter_of_another_model(tmp_path, capsys):
    tiny_gpt2().save_pretrained(tmp_path / "gpt2")
    paca.save_adapter(adapted(tiny_llama), tmp_path / "adapter")
    argv = [
        "export-lora",
        "--model",
        str(tmp_path / "gpt2"),
        "--adapter",
        str(tmp_path / "adapter"),
    ]
    assert main([*argv, "--output", str(tmp_path / "lora")]) == 2
    err = capsys.readouterr().err
    assert "does not exist in GPT2LMHeadModel" in err and "Traceback" not in err
    assert not (tmp_path / "lora").exists()


def test_causal_lm_export_is_servable_and_says_how(tmp_path, caplog):
    from safetensors.torch import load_file

    from paca.adapters.lora import TRAINED_MODULES, serving_hints

    model = paca.enable(tiny_llama(), r=4, trainable_modules=["lm_head"])
    with torch.no_grad():
        model.lm_head.trained.weight.add_(0.5)
    with caplog.at_level("WARNING", logger="paca"):
        out = paca.export_lora(model, tmp_path / "lora")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None, "vLLM refuses adapters with modules_to_save"
    assert not any("lm_head" in k for k in load_file(out / "adapter_model.safetensors"))
    trained = load_file(out / TRAINED_MODULES)
    assert torch.equal(trained["lm_head.weight"], model.lm_head.trained.weight.detach())
    assert "['lm_head'] of this causal LM were trained in full" in caplog.text
    hints = serving_hints(out)
    assert hints["max_lora_rank"] == 8 and hints["modules_to_save"] == []
    assert hints["lora_target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert "--max-lora-rank 8 --lora-target-modules down_proj gate_proj" in hints["vllm"]


@pytest.mark.parametrize("r, rank", [(1, 1), (8, 8), (9, 16), (300, 320)])
def test_vllm_rank_is_the_smallest_allowed_that_fits(tmp_path, r, rank):
    from paca.adapters.lora import serving_hints

    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"r": r, "target_modules": ["model.layers.0.mlp.up_proj"]})
    )
    assert serving_hints(tmp_path)["max_lora_rank"] == rank


def test_serving_hints_of_a_folder_that_is_no_lora_export(tmp_path):
    from paca.adapters.lora import serving_hints

    with pytest.raises(ValueError, match="is not the config of a LoRA adapter"):
        serving_hints(tmp_path)


def test_cli_export_and_merge_default_to_the_base_the_adapter_records(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    model = adapted(lambda: AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval())
    ids = token_batch()
    expected = model(ids).logits.detach()
    paca.save_adapter(model, tmp_path / "adapter")  # records base_model_name_or_path
    argv = ["export", "--adapter", str(tmp_path / "adapter")]
    assert main([*argv, "--output", str(tmp_path / "lora")]) == 0
    assert f"base model: {tmp_path / 'base'} (recorded in" in capsys.readouterr().out
    lora = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora").eval()
    torch.testing.assert_close(lora(ids).logits, expected, rtol=1e-5, atol=1e-5)
    assert main(["merge", "--adapter", str(tmp_path / "adapter"), "--output",
                 str(tmp_path / "merged")]) == 0  # fmt: skip
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-5, atol=1e-5)
    # an adapter that records no base: one line naming the fix, nothing written
    paca.save_adapter(adapted(tiny_llama), tmp_path / "anonymous")
    config = tmp_path / "anonymous" / "adapter_config.json"
    config.write_text(
        json.dumps(json.loads(config.read_text()) | {"base_model_name_or_path": None})
    )
    assert main(["export", "--adapter", str(config.parent), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "does not record its base model" in err and "pass --model <folder" in err
    assert not (tmp_path / "o").exists()
