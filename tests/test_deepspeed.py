"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU (DS_ACCELERATOR=cpu, gloo, 2 processes), with DeepSpeed's
own engine and optimizer: the deltas of one process to 1e-6, and the trained model computing
what its deltas say.

DeepSpeed's optimizer steps flat fp32 partitions and copies them back into the parameters
through ``.data``, past torch.optim's step hooks, so merged mode's columns go stale unless
``paca.sync_weights`` runs after each step; additive mode needs nothing. (The Hugging Face
Trainer with DeepSpeed does not start on a machine without a GPU: accelerate gives DeepSpeed
one process there, see docs/distributed.md.)
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from distributed_worker import batches, train

import paca

pytest.importorskip("deepspeed", reason="DeepSpeed (pip install 'paca[deepspeed]')")
WORKER = Path(__file__).parent / "deepspeed_worker.py"


def _run(tmp_path, *args) -> dict:
    out = tmp_path / "d.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--standalone", str(WORKER), *args, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def one_process():
    return train(None, "merged")


def _errors(result, reference) -> tuple[float, float]:
    """(largest delta error against one process, largest gap between the trained model's
    logits and what its deltas compute in a fresh additive model)."""
    deltas = result["deltas"]
    error = max((deltas[n] - reference[n]).abs().max().item() for n in reference)
    fresh = paca.enable(tiny_llama(), r=4, alpha=8, mode="additive", seed=1)
    with torch.no_grad():
        for name, layer in paca.paca_layers(fresh):
            layer.delta.copy_(deltas[name])
        gap = (fresh(input_ids=batches(0, 1)[0]).logits - result["logits"]).abs().max().item()
    return error, gap


@pytest.mark.parametrize(
    "stage, mode, sync", [(2, "additive", False), (3, "additive", False), (2, "merged", True)]
)
def test_zero_two_processes_match_one(tmp_path, one_process, stage, mode, sync):
    args = ["--stage", str(stage), "--mode", mode] + (["--sync"] if sync else [])
    error, gap = _errors(_run(tmp_path, *args), one_process)
    assert error < 1e-6 and gap < 1e-5, (error, gap)


def test_merged_mode_under_deepspeed_needs_sync_weights(tmp_path, one_process):
    # the hazard paca.sync_weights exists for: without it the columns in the weights are stale
    error, gap = _errors(_run(tmp_path, "--stage", "2", "--mode", "merged"), one_process)
    assert error > 1e-3 and gap > 1e-3, (error, gap)
