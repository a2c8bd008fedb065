"""paca bench: structure of the results (never timings)."""

import json
import sys

import pytest
import torch

from paca.cli import main
from paca.recipes import bench


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return bench.run(bench.BenchConfig.quick(output=str(out), plot=True), progress=False), out


@pytest.mark.skipif(sys.platform != "linux", reason="ru_minflt as Linux counts it")
def test_minor_faults_count_fresh_memory():
    before = bench._minor_faults()
    fresh = bytearray(64 * 2**20)  # mapped fresh and zero-filled by the kernel on first touch
    fresh[::4096] = b"x" * len(fresh[::4096])
    assert bench._minor_faults() - before >= 64 * 2**20 // 4096 // 2


def test_quick_run_has_every_method_and_the_schema(quick_report):
    report, out = quick_report
    assert list(report["methods"]) == list(bench.DEFAULT_METHODS)
    keys = {
        "step_ms", "x_frozen", "x_lora", "x_peft_paca", "saved_bytes", "saved_x_frozen",
        "saved_x_lora", "aten_ops", "aten_view_ops", "extra_ops", "trainable_params", "memory",
        "page_faults",
    }  # fmt: skip
    for row in report["methods"].values():
        assert set(row) == keys
        assert row["step_ms"] > 0 and row["aten_ops"] > 0
        if sys.platform == "linux":
            assert row["page_faults"] >= 0
    assert set(report["machine"]) >= {"torch", "device", "cpu_count", "cpu", "bf16_native"}
    native, why = report["machine"]["bf16_native"]
    assert isinstance(native, bool) and why
    assert "CPU: " in (out / "bench.md").read_text()
    assert set(report["bar"]) and all(
        {"value", "limit", "met"} <= set(c) for c in report["bar"].values()
    )
    on_disk = json.loads((out / "bench.json").read_text())
    assert on_disk["methods"].keys() == report["methods"].keys()
    assert "| paca |" in (out / "bench.md").read_text()
    assert (out / "bench.png").stat().st_size > 1000


def test_quick_run_structure_paca_against_lora(quick_report):
    rows = quick_report[0]["methods"]
    assert rows["frozen"]["trainable_params"] == 0
    # the A/A copy: the same model, the same saved bytes and ops; only its time differs
    aa = rows["frozen-aa"]
    assert (aa["saved_bytes"], aa["aten_ops"], aa["trainable_params"]) == (
        rows["frozen"]["saved_bytes"], rows["frozen"]["aten_ops"], 0
    )  # fmt: skip
    assert rows["paca"]["saved_bytes"] < rows["lora"]["saved_bytes"]
    assert rows["paca"]["saved_bytes"] >= rows["frozen"]["saved_bytes"]
    assert 0 < rows["paca"]["extra_ops"] < rows["lora"]["extra_ops"]
    # delta is out x r for each of the 7 projections of 2 layers: q, k, v, o and down have
    # hidden outputs, gate and up have the MLP width
    config = bench.build_model(bench.BenchConfig.quick()).config
    expected = 2 * 8 * (5 * config.hidden_size + 2 * config.intermediate_size)
    assert rows["paca"]["trainable_params"] == expected


def test_op_counter_counts_the_kernels_of_paca_ops():
    x, idx = torch.randn(4, 6), torch.tensor([0, 2])
    with bench.OpCounter("cpu") as counter:
        torch.ops.paca.gather_cols(x, idx)
    assert counter.ops == 1  # index_select
    with bench.OpCounter("cpu") as counter:
        x.index_select(-1, idx)
        x.sum()
    assert counter.ops == 2


def test_saved_bytes_counts_each_storage_once():
    layer = torch.nn.Linear(8, 8)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, inputs_embeds, labels):
            h = torch.tanh(inputs_embeds)
            out = self.layer(h) * h  # h saved twice (by linear and mul): counted once
            return type("Out", (), {"loss": out.sum()})

    embeds = torch.randn(3, 8)
    saved = bench.saved_bytes(Model(), None, embeds, None)
    # tanh saves its output h; linear saves h again (same storage); mul saves h and the linear
    # output: two storages in all
    assert saved == 2 * 3 * 8 * 4


def test_max_seq_bisection(monkeypatch):
    calls = []

    def fake(method, cfg):
        calls.append((method, cfg.seq))
        per_token = {"paca": 1000, "lora": 1300}[method]
        return {"used": 50_000 + per_token * cfg.seq}

    monkeypatch.setattr(bench, "_memory_in_subprocess", fake)
    cfg = bench.BenchConfig.quick(methods=["paca", "lora"])
    result = bench.max_seq(cfg, budget=1_000_000, step=16, progress=False)
    assert result["methods"]["paca"]["max_seq"] == 944  # largest multiple of 16 <= 950
    assert result["methods"]["lora"]["max_seq"] == 720  # <= 730.7
    assert result["methods"]["paca"]["x_lora"] == pytest.approx(944 / 720)


def test_memory_worker_runs_in_a_subprocess():
    result = bench._memory_in_subprocess("paca", bench.BenchConfig.quick(seq=16))
    assert "error" not in result, result
    assert result["used"] > 0 and result["peak_rss"] >= result["used"]


def test_cli_quick_and_bad_input(tmp_path, capsys):
    assert main(["bench", "--quick", "--methods", "frozen,paca", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| paca |" in out and (tmp_path / "bench.json").is_file()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--quick", "--methods", "paca,qlora"])
    assert exc.value.code == 2
    assert "unknown bench methods ['qlora']" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--max-seq", "--memory-budget", "lots"])
    assert exc.value.code == 2
    assert "memory budget 'lots' is not a positive size" in capsys.readouterr().err


def test_parse_bytes():
    assert bench.parse_bytes("4GiB") == 4 * 2**30
    assert bench.parse_bytes("1.5 MiB") == int(1.5 * 2**20)
    assert bench.parse_bytes("2GB") == 2 * 10**9


def test_quantized_base_runs_qpaca_against_qlora(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    cfg = bench.BenchConfig.quick(
        quantize="4bit", methods=["frozen", "paca", "lora", "full"], output=str(tmp_path)
    )
    report = bench.run(cfg, progress=False)
    assert list(report["methods"]) == ["frozen", "paca", "lora"]
    assert "full" in report["skipped"]
    rows = report["methods"]
    assert rows["paca"]["saved_bytes"] < rows["lora"]["saved_bytes"]
    assert "4bit base" in (tmp_path / "bench.md").read_text()
    assert list(report["bar"]) == ["step time < 1.00x QLoRA", "saved bytes < 1.00x QLoRA"]
    assert report["bar"]["saved bytes < 1.00x QLoRA"]["met"]
    # the harness really ran on bitsandbytes layers, PaCA beside them in additive mode
    model, _ = bench.prepare("paca", bench.build_model(cfg), cfg, torch.device("cpu"))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.mode == "additive" and isinstance(layer.base_layer, bnb.nn.Linear4bit)


def test_dropbp_methods_save_less_and_optimizers_are_selectable(quick_report):
    rows = quick_report[0]["methods"]
    # quick: 2 layers, rate 0.5, seed 0: some branch is dropped in the measured step
    assert rows["paca-dropbp"]["saved_bytes"] < rows["paca"]["saved_bytes"]
    assert rows["lora-dropbp"]["saved_bytes"] < rows["lora"]["saved_bytes"]
    assert rows["paca-dropbp"]["trainable_params"] == rows["paca"]["trainable_params"]
    for optim, flag in (("fused", "fused"), ("foreach", "foreach")):
        cfg = bench.BenchConfig.quick(optim=optim)
        _, optimizer = bench.prepare("paca", bench.build_model(cfg), cfg, torch.device("cpu"))
        assert optimizer.defaults[flag] is True
    with pytest.raises(bench.PacaError, match="optim='adam'"):
        bench.BenchConfig(optim="adam")


def test_preset_sets_the_shape_and_flags_override_it(tmp_path, monkeypatch):
    cfg = bench.BenchConfig.preset("smollm2", layers=2)
    assert (cfg.hidden, cfg.layers, cfg.vocab, cfg.model) == (576, 2, 8000, "llama")
    seen = {}

    class Seen(Exception):
        pass

    def fake_run(cfg):
        seen["cfg"] = cfg
        raise Seen

    monkeypatch.setattr(bench, "run", fake_run)
    with pytest.raises(Seen):
        main(["bench", "--preset", "smollm2", "--layers", "3", "--optim", "fused"])
    assert (seen["cfg"].hidden, seen["cfg"].layers, seen["cfg"].optim) == (576, 3, "fused")


def test_overhead_preset_runs_tiny_layers_at_depth(tmp_path):
    # the preset's point is depth at negligible width: each method's per-layer costs alone
    cfg = bench.BenchConfig.preset("overhead", layers=2, rounds=1, peak_memory=False)
    assert (cfg.hidden, cfg.seq, cfg.vocab) == (64, 16, 256)
    cfg.methods, cfg.output = ["frozen", "paca"], str(tmp_path)
    report = bench.run(cfg, progress=False)["methods"]
    assert report["frozen"]["x_frozen"] == 1.0 and report["paca"]["step_ms"] > 0
    assert report["paca"]["extra_ops"] > 0  # the gather, grad_delta GEMM, write, optimizer


def test_bf16_bench_trains_each_method_with_fp32_trained_tensors(monkeypatch, tmp_path):
    methods = ["frozen", "paca", "lora", "full"]
    cfg = bench.BenchConfig.quick(dtype="bf16", methods=methods, output=str(tmp_path / "bf16"))
    assert cfg.dtype == "bfloat16"
    trained = {}
    prepare = bench.prepare

    def spy(method, base, cfg, device, copy_model=True):
        model, optimizer = prepare(method, base, cfg, device, copy_model)
        trained[method] = {p.dtype for p in model.parameters() if p.requires_grad}
        return model, optimizer

    monkeypatch.setattr(bench, "prepare", spy)
    rows = bench.run(cfg, progress=False)["methods"]
    assert list(rows) == methods and all(row["step_ms"] > 0 for row in rows.values())
    assert trained == {"frozen": set(), "paca": {torch.float32}, "lora": {torch.float32},
                       "full": {torch.float32}}  # fmt: skip
    # bf16 activations and columns for backward: fewer bytes (not half: RMSNorm and the loss
    # compute in fp32 and save some of that)
    fp32_cfg = bench.BenchConfig.quick(methods=["paca"], output=str(tmp_path / "fp32"))
    fp32 = bench.run(fp32_cfg, progress=False)["methods"]["paca"]
    assert rows["paca"]["saved_bytes"] < 0.8 * fp32["saved_bytes"]


def test_peft_paca_is_asked_for_by_name_and_skipped_where_peft_lacks_it():
    peft = pytest.importorskip("peft")
    assert "peft-paca" in bench.METHODS and "peft-paca" not in bench.DEFAULT_METHODS
    methods, skipped = bench.available_methods(bench.BenchConfig(methods=["frozen", "peft-paca"]))
    if hasattr(peft, "PacaConfig"):
        assert methods == ["frozen", "peft-paca"]
    else:
        assert methods == ["frozen"]
        assert f"peft {peft.__version__} has no PaCA" in skipped["peft-paca"]
