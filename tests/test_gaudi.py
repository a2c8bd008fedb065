"""The Gaudi integration on CPU, with stand-ins for habana_frameworks and optimum.habana.

Only what a CPU cannot run is checked here: lazy mode (``mark_step`` placement, no host sync
inside PaCA's forward and backward), ``PT_HPU_LAZY_MODE`` against the mode asked for, the
import order ``GaudiConfig`` needs. Optimum-Habana's real classes, as a CPU dry run, are
tested in ``tests/test_gaudi_optimum.py`` (the compat leg).

The stand-ins record what paca asks of them: imports, mark_step calls, the Gaudi config and
training arguments. The stand-in GaudiTrainer places mark_step as Optimum-Habana 1.21 does in
lazy mode (after backward, after the optimizer step), and the stand-in GaudiConfig enforces
the real rule that autocast op lists cannot be declared once habana_frameworks.torch.core was
imported.
"""

import dataclasses
import importlib.abc
import importlib.util
import json
import subprocess
import sys
import types

import pytest
import torch
import transformers
from conftest import Tokens, tiny_llama
from torch.optim.optimizer import register_optimizer_step_pre_hook

import paca
from paca import backends, ops
from paca.integrations import gaudi
from paca.layer import PacaLinear

CORE = "habana_frameworks.torch.core"


class _FakeHabana(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports of habana_frameworks.* give recording stand-ins (nothing is in sys.modules
    until something imports it, as with the real package)."""

    def __init__(self, events):
        self.events, self.imported = events, []

    def find_spec(self, name, path=None, target=None):
        if name == "habana_frameworks" or name.startswith("habana_frameworks."):
            return importlib.util.spec_from_loader(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.imported.append(module.__name__)
        if module.__name__ == CORE:
            module.mark_step = lambda: self.events.append("mark_step")


@dataclasses.dataclass
class GaudiTrainingArguments(transformers.TrainingArguments):
    use_habana: bool = False
    use_lazy_mode: bool = False


class GaudiConfig:
    def __init__(self, **settings):
        if settings.get("autocast_bf16_ops") and CORE in sys.modules:
            raise RuntimeError(f"autocast op lists declared after {CORE} was imported")
        self.settings = settings

    def save_pretrained(self, folder):
        with open(f"{folder}/gaudi_config.json", "w") as f:
            json.dump(self.settings, f)


class _MarkAfterStep(transformers.TrainerCallback):
    def __init__(self, htcore):
        self.htcore = htcore

    def on_optimizer_step(self, *args, **kwargs):
        self.htcore.mark_step()


class GaudiTrainer(transformers.Trainer):
    def __init__(self, model=None, gaudi_config=None, args=None, **kwargs):
        self.gaudi_config = gaudi_config
        super().__init__(model=model, args=args, **kwargs)
        if args.use_lazy_mode:
            import habana_frameworks.torch.core as htcore

            self.htcore = htcore
            self.add_callback(_MarkAfterStep(htcore))  # after the optimizer step

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        if self.args.use_lazy_mode:
            self.htcore.mark_step()  # after backward
        return loss


def _fake_optimum_habana():
    optimum = types.ModuleType("optimum")
    optimum.__path__ = []
    habana = types.ModuleType("optimum.habana")
    habana.GaudiConfig, habana.GaudiTrainer = GaudiConfig, GaudiTrainer
    habana.GaudiTrainingArguments = GaudiTrainingArguments
    optimum.habana = habana
    return optimum, habana


@pytest.fixture
def stand_ins(monkeypatch):
    # accelerate imports deepspeed (when installed) on its first unwrap_model; deepspeed picks
    # its accelerator at import, and would take the stand-ins for a Gaudi. Import it first, on
    # the CPU, as it is on a machine without one (the suite passed only when an earlier test
    # file had imported it).
    if importlib.util.find_spec("deepspeed") is not None:
        importlib.import_module("deepspeed")
    events = []
    finder = _FakeHabana(events)
    for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    optimum, habana = _fake_optimum_habana()
    monkeypatch.setitem(sys.modules, "optimum", optimum)
    monkeypatch.setitem(sys.modules, "optimum.habana", habana)
    monkeypatch.delenv(gaudi.LAZY_ENV, raising=False)
    yield finder, habana
    for name in [m for m in sys.modules if m.startswith("habana_frameworks")]:
        del sys.modules[name]


def test_importing_the_integration_imports_no_gaudi_package():
    code = (
        "import sys, paca, paca.integrations.gaudi\n"
        "print(sorted(m for m in sys.modules if m.startswith(('habana', 'optimum'))))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_enable_registers_hpu_kernels_without_importing_habana(stand_ins):
    finder, habana = stand_ins
    model = gaudi.enable(tiny_llama(), r=4)
    assert "hpu" in backends.loaded() and len(paca.paca_layers(model)) == 14
    assert all(p.device.type == "cpu" for p in model.parameters())  # the Trainer moves it
    assert finder.imported == []
    habana.GaudiConfig(autocast_bf16_ops=["mm"])  # still allowed: core was not imported
    import habana_frameworks.torch.core  # noqa: F401

    with pytest.raises(RuntimeError, match="after habana_frameworks.torch.core"):
        habana.GaudiConfig(autocast_bf16_ops=["mm"])  # the stand-in enforces the real rule
    with pytest.raises(ValueError, match="leaves the device to the Trainer"):
        gaudi.enable(tiny_llama(), r=4, device="hpu")


@pytest.mark.parametrize("mode", ["merged", "additive"])
def test_gaudi_trainer_lazy_mode_marks_steps_around_paca_and_never_syncs(
    stand_ins, tmp_path, monkeypatch, mode
):
    finder, habana = stand_ins
    events = finder.events
    monkeypatch.setenv(gaudi.LAZY_ENV, "1")
    model = gaudi.enable(tiny_llama(), r=4, mode=mode)

    # record paca's column writes, optimizer steps, and host syncs / autocast queries made
    # inside paca's forward and backward
    inside, syncs, autocast_devices = [], [], []
    write = PacaLinear._write_cols
    monkeypatch.setattr(
        PacaLinear, "_write_cols", lambda self, *a: (events.append("write"), write(self, *a))[1]
    )

    def tracked(function):
        def run(*args, **kwargs):
            inside.append(1)
            try:
                return function(*args, **kwargs)
            finally:
                inside.pop()

        return run

    monkeypatch.setattr(PacaLinear, "forward", tracked(PacaLinear.forward))
    for fn in (ops._MergedLinear, ops._PartialLinear):
        monkeypatch.setattr(fn, "backward", staticmethod(tracked(fn.backward)))
    for name in ("item", "tolist", "cpu", "numpy", "__bool__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            if inside:
                syncs.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    is_autocast = torch.is_autocast_enabled

    def autocast_spy(*args):
        if inside:
            autocast_devices.append(args[0] if args else None)
        return is_autocast(*args)

    monkeypatch.setattr(torch, "is_autocast_enabled", autocast_spy)
    handle = register_optimizer_step_pre_hook(lambda *a: events.append("step"))
    args = habana.GaudiTrainingArguments(
        output_dir=str(tmp_path),
        use_habana=True,
        use_lazy_mode=True,
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    try:
        trainer = gaudi.gaudi_trainer(model, args, train_dataset=Tokens(12))
        trainer.train()
    finally:
        handle.remove()

    assert trainer.gaudi_config.settings["use_fused_adam"] is True
    assert CORE in finder.imported  # the trainer, not paca, imported it
    assert syncs == [], f"host syncs inside PaCA's forward/backward: {syncs}"
    assert set(autocast_devices) <= {"cpu"}  # the input's device type, never a fixed one
    writes = 14 if mode == "merged" else 0
    step = ["mark_step", "step", *["write"] * writes, "mark_step"]  # backward | step+write
    assert events == step * 3
    checkpoint = tmp_path / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter.safetensors", "gaudi_config.json", "optimizer.pt"} <= files
    assert "model.safetensors" not in files


def test_execution_mode_must_match_the_environment(stand_ins, monkeypatch, tmp_path):
    finder, habana = stand_ins
    monkeypatch.setenv(gaudi.LAZY_ENV, "0")
    args = habana.GaudiTrainingArguments(
        output_dir=str(tmp_path), use_habana=True, use_lazy_mode=True, use_cpu=True
    )
    with pytest.raises(RuntimeError, match="start the process with PT_HPU_LAZY_MODE=1"):
        gaudi.gaudi_trainer(gaudi.enable(tiny_llama(), r=4), args)
    monkeypatch.setenv(gaudi.LAZY_ENV, "1")
    plain = transformers.TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    with pytest.raises(RuntimeError, match="PT_HPU_LAZY_MODE=0"):
        gaudi.hpu_trainer(gaudi.enable(tiny_llama(), r=4), plain)
    monkeypatch.delenv(gaudi.LAZY_ENV)
    trainer = gaudi.hpu_trainer(gaudi.enable(tiny_llama(), r=4), plain)
    assert isinstance(trainer, paca.Trainer)
    assert __import__("os").environ[gaudi.LAZY_ENV] == "0"  # set before habana is imported


def test_gaudi_trainer_without_optimum_habana_explains(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.habana", None)  # import fails, as off Gaudi
    with pytest.raises(ImportError, match="use hpu_trainer"):
        gaudi.gaudi_trainer(tiny_llama(), output_dir="unused")
