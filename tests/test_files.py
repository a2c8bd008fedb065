"""The one atomic writer: a failed save (full disk, killed process) never replaces what was
there, and leaves no temporary files behind."""

import errno
import os

import pytest
import torch
from conftest import tiny_llama, token_batch, train_lm

import paca
from paca.adapters import common, paca_format


def _trained(steps=2):
    model = paca.enable(tiny_llama(), r=4)
    train_lm(model, token_batch(), steps)
    return model


def _disk_full(*args, **kwargs):
    path = args[1] if len(args) > 1 else kwargs["filename"]
    with open(path, "wb") as f:
        f.write(b"half a file")  # what a full disk leaves: a truncated write
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_failed_save_keeps_the_previous_adapter(tmp_path, monkeypatch):
    model = _trained()
    paca.save_adapter(model, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    train_lm(model, token_batch(), 2)  # the adapter moved on
    monkeypatch.setattr(paca_format, "save_file", _disk_full)
    with pytest.raises(OSError, match="No space left on device") as info:
        paca.save_adapter(model, tmp_path / "adapter")
    assert isinstance(info.value, paca.PacaError), "a one-line error for the CLI"
    assert "is as it was before" in str(info.value)
    after = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    assert after == before, "the previous adapter is intact, no temporary file is left"
    fresh = paca.load_adapter(tiny_llama(), tmp_path / "adapter")
    assert fresh is not None


def test_a_failed_folder_write_keeps_the_previous_folder(tmp_path):
    target = tmp_path / "out"
    with common.atomic_dir(target) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(common.OutputExists, match="exists; choose another output"):
        with common.atomic_dir(target):
            pass
    with pytest.raises(RuntimeError, match="interrupted"):
        with common.atomic_dir(target, replace=True) as staging:
            (staging / "a.txt").write_text("second, half")
            raise RuntimeError("interrupted")
    assert (target / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with common.atomic_dir(target, replace=True) as staging:
        (staging / "b.txt").write_text("second")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    mask = os.umask(0o022)
    os.umask(mask)  # the folder as mkdir makes it, not mkdtemp's 0700 (a server's user reads it)
    assert target.stat().st_mode & 0o777 == 0o777 & ~mask


def test_a_replace_killed_between_its_renames_gets_the_old_folder_back(tmp_path):
    target = tmp_path / "out"
    with common.atomic_dir(target) as staging:
        (staging / "a.txt").write_text("first")
    target.rename(tmp_path / ".out.old")  # killed here: the old one moved aside, no new one
    with pytest.raises(common.OutputExists):
        with common.atomic_dir(target):
            pass
    assert (target / "a.txt").read_text() == "first"


def test_cpu_tensors_are_contiguous_independent_copies():
    weight = torch.randn(4, 6)
    tied = {"a": weight, "b": weight, "view": weight.t()}
    copies = common.cpu_tensors(tied, prefix="m.")
    assert sorted(copies) == ["m.a", "m.b", "m.view"]
    assert all(t.is_contiguous() for t in copies.values())
    assert copies["m.a"].data_ptr() != copies["m.b"].data_ptr() != weight.data_ptr()


def test_every_writer_refuses_a_non_finite_adapter_and_writes_nothing(tmp_path):
    model = _trained()
    with torch.no_grad():
        paca.paca_layers(model)[1][1].delta[0, 0] = float("inf")
    writers = {
        "paca": lambda out: paca.save_adapter(model, out),
        "peft": lambda out: paca.save_adapter(model, out, format="peft"),
        "lora": lambda out: paca.export_lora(model, out),
    }
    for name, write in writers.items():
        with pytest.raises(paca.PacaError, match="holds NaN or inf; refusing"):
            write(tmp_path / name)
        assert not (tmp_path / name).exists(), name
    with pytest.raises(paca.PacaError, match="holds NaN or inf; refusing to merge"):
        paca.merge(model)
    # a training checkpoint keeps what the Trainer has (as the plain Trainer would)
    paca.save_adapter(model, tmp_path / "checkpoint", allow_non_finite=True)
    assert (tmp_path / "checkpoint" / "adapter.safetensors").is_file()
