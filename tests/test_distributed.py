"""Several processes (gloo, CPU, 2 processes): DDP, accelerate and FSDP2 train an adapted tiny
LLaMA to the deltas of one process with the same global batch (fp32, 1e-6)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_worker import train
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "distributed_worker.py"


def _launch(command: list[str], out: Path) -> dict[str, torch.Tensor]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent))
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=240, env=env, cwd=WORKER.parent
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out)


def _torchrun(engine: str, mode: str, out: Path) -> dict[str, torch.Tensor]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", str(WORKER), "--engine", engine, "--mode", mode]
    return _launch([*command, "--out", str(out)], out)


def _assert_same(got, want):
    assert got.keys() == want.keys() and len(want) == 14
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-6, msg=name)
    assert all(d.abs().max() > 0 for d in want.values())


@pytest.mark.parametrize("mode", ["merged", "additive"])
def test_ddp_two_processes_match_one(tmp_path, mode):
    _assert_same(_torchrun("ddp", mode, tmp_path / "d.pt"), train(None, mode))


def test_fsdp2_additive_two_processes_match_one_and_save_the_whole_adapter(tmp_path):
    want = train(None, "additive")
    out = tmp_path / "d.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", str(WORKER), "--engine", "fsdp", "--mode", "additive"]
    _assert_same(_launch([*command, "--save", str(tmp_path / "a"), "--out", str(out)], out), want)
    # save_adapter on the sharded model gathers each delta whole, on every process
    for rank in (0, 1):
        saved = load_file(tmp_path / f"a-rank{rank}" / "adapter.safetensors")
        deltas = {k.removesuffix(".delta"): v for k, v in saved.items() if k.endswith(".delta")}
        _assert_same(deltas, want)


def test_accelerate_launch_two_processes_match_one(tmp_path):
    pytest.importorskip("accelerate")
    config = tmp_path / "accelerate.yaml"
    # accelerate's MULTI_CPU launcher needs mpirun; its torchrun-based launcher (MULTI_GPU)
    # starts the 2 processes, and Accelerator(cpu=True) in the script makes them CPU (gloo)
    config.write_text(
        "compute_environment: LOCAL_MACHINE\n"
        "distributed_type: MULTI_GPU\n"
        "num_machines: 1\n"
        "num_processes: 2\n"
        "machine_rank: 0\n"
        "mixed_precision: 'no'\n"
        "use_cpu: false\n"
    )
    out = tmp_path / "d.pt"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    command += ["--main_process_port", "29531", str(WORKER), "--engine", "accelerate"]
    _assert_same(_launch([*command, "--out", str(out)], out), train(None, "merged"))


def test_fsdp2_merged_mode_is_refused_with_the_fix(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", str(WORKER), "--engine", "fsdp", "--mode", "merged"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [*command, "--out", str(tmp_path / "d.pt")],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert result.returncode != 0
    assert "paca.enable(model, mode='additive') before fully_shard" in result.stderr
    assert not (tmp_path / "d.pt").exists()
