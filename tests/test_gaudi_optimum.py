"""``gaudi_trainer`` with Optimum-Habana's real classes, as a CPU dry run (no stand-ins).

Runs where optimum-habana is installed: the compat leg (``ci/compat.sh``, the Gaudi image's
pins: optimum-habana 1.21.2, transformers 4.55.x). No ``habana_frameworks`` exists here; what
only a Gaudi can check (lazy mode, HPU kernels and graphs, Habana's fused optimizer) is in
``tests/test_gaudi.py`` against stand-ins, or not checked (docs/distributed.md).
"""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import Tokens, tiny_llama, trainer_settings

import paca
from paca.integrations import gaudi


def _installed() -> bool:
    try:
        return importlib.util.find_spec("optimum.habana") is not None
    except ModuleNotFoundError:  # no optimum at all
        return False


pytestmark = pytest.mark.skipif(
    not _installed(),
    reason="optimum-habana is not installed: the compat leg (ci/compat.sh) installs it at the "
    "Gaudi image's pins",
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gaudi" / "train.py"


@pytest.fixture
def classes():
    """Optimum-Habana's classes; the environment variables its arguments set are restored."""
    environ = dict(os.environ)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped version check warns on the first call
        config_cls, trainer_cls, arguments_cls = gaudi.optimum_habana()
    yield config_cls, trainer_cls, arguments_cls
    os.environ.clear()
    os.environ.update(environ)


def _settings(out, **overrides):
    # GaudiTrainingArguments' defaults differ from TrainingArguments' (adam_epsilon 1e-6 vs
    # 1e-8; optim): both are set, so the two trainers get the same arguments
    return trainer_settings(out, **{"adam_epsilon": 1e-6, "optim": "adamw_torch", **overrides})


def _dry_run_args(arguments_cls, out, **overrides):
    return arguments_cls(use_habana=False, use_lazy_mode=False, **_settings(out, **overrides))


def _model():
    return paca.enable(tiny_llama(), r=4, alpha=8, seed=1)


def _deltas(model):
    return {name: layer.delta.detach().clone() for name, layer in paca.paca_layers(model)}


def _assert_same(a, b, tol):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tol, msg=name)


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_optimum_habana_returns_its_own_classes_after_the_plain_import_failed():
    # in a fresh process: the plain import fails off Gaudi (the reason for the work-around) and
    # leaves its submodules behind; optimum_habana() then returns the package's own classes,
    # warns, and imports nothing of habana_frameworks
    code = (
        "import sys, warnings\n"
        "try:\n"
        "    import optimum.habana\n"
        "except IndexError as exc:\n"
        "    print('plain import: IndexError')\n"
        "from paca.integrations import gaudi\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    found = gaudi.optimum_habana()\n"
        "import optimum.habana as package\n"
        "from optimum.habana.transformers.trainer import GaudiTrainer\n"
        "assert found == (package.GaudiConfig, GaudiTrainer, package.GaudiTrainingArguments)\n"
        "assert package.transformers is sys.modules['optimum.habana.transformers']\n"
        "assert gaudi.optimum_habana() == found\n"
        "print(package.__version__)\n"
        "print(sorted(m for m in sys.modules if m.startswith('habana_frameworks')))\n"
        "print([str(w.message) for w in caught])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    plain, version, habana, caught = result.stdout.strip().splitlines()
    assert plain == "plain import: IndexError"
    assert version.startswith("1.")
    assert habana == "[]"
    assert "SynapseAI version check was skipped" in caught


def test_dry_run_trains_as_the_plain_trainer(classes, tmp_path):
    config_cls, trainer_cls, arguments_cls = classes
    plain_model, gaudi_model = _model(), _model()
    _assert_same(_deltas(plain_model), _deltas(gaudi_model), tol=0)
    settings = dict(eval_strategy="steps", eval_steps=3, per_device_eval_batch_size=4)
    plain = paca.Trainer(
        model=plain_model,
        args=transformers.TrainingArguments(**_settings(tmp_path / "plain", **settings)),
        train_dataset=Tokens(),
        eval_dataset=Tokens(8, seed=4),
    )
    plain.train()
    with pytest.warns(UserWarning, match="dry run of the Gaudi script"):
        trainer = gaudi.gaudi_trainer(
            gaudi_model,
            _dry_run_args(arguments_cls, tmp_path / "gaudi", **settings),
            train_dataset=Tokens(),
            eval_dataset=Tokens(8, seed=4),
        )
    assert isinstance(trainer, trainer_cls) and isinstance(trainer.gaudi_config, config_cls)
    trainer.train()

    assert len(_losses(trainer)) == 6  # log() ran at every step, without HPU memory statistics
    assert not any("memory_allocated (GB)" in entry for entry in trainer.state.log_history)
    torch.testing.assert_close(_losses(trainer), _losses(plain), rtol=0, atol=1e-5)
    _assert_same(_deltas(gaudi_model), _deltas(plain_model), tol=1e-5)
    evaluated = trainer.evaluate()["eval_loss"]
    torch.testing.assert_close(evaluated, plain.evaluate()["eval_loss"], rtol=0, atol=1e-5)
    # the Gaudi-only generation fields were there only while a loop ran
    assert not any(hasattr(gaudi_model.generation_config, f) for f in gaudi.GAUDI_GENERATION_FIELDS)
    assert not any(m.startswith("habana_frameworks") for m in sys.modules)


@pytest.mark.filterwarnings("ignore:GaudiTrainer runs with use_habana=False")
def test_dry_run_checkpoints_hold_adapter_and_gaudi_config_and_resume_exactly(classes, tmp_path):
    config_cls, _, arguments_cls = classes
    save = dict(save_strategy="steps", save_steps=3)
    full = _model()
    gaudi.gaudi_trainer(
        full, _dry_run_args(arguments_cls, tmp_path / "full", **save), train_dataset=Tokens()
    ).train()

    class _StopAt3(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                control.should_training_stop = True

    out = tmp_path / "run"
    first = gaudi.gaudi_trainer(
        _model(),
        _dry_run_args(arguments_cls, out, **save),
        train_dataset=Tokens(),
        callbacks=[_StopAt3()],
    )
    first.train()
    checkpoint = out / "checkpoint-3"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter.safetensors", "adapter_config.json", "gaudi_config.json"} <= files
    assert {"optimizer.pt", "scheduler.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    saved = config_cls.from_pretrained(str(checkpoint))
    assert saved.use_fused_adam is True and saved.use_fused_clip_norm is True
    assert json.loads((checkpoint / "gaudi_config.json").read_text())["use_fused_adam"] is True

    resumed_model = _model()
    resumed = gaudi.gaudi_trainer(
        resumed_model, _dry_run_args(arguments_cls, out, **save), train_dataset=Tokens()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6
    _assert_same(_deltas(resumed_model), _deltas(full), tol=1e-6)

    resumed.save_model(str(tmp_path / "final"))
    final = {p.name for p in (tmp_path / "final").iterdir()}
    assert {"adapter.safetensors", "gaudi_config.json"} <= final
    assert "model.safetensors" not in final


@pytest.mark.filterwarnings("ignore:GaudiTrainer runs with use_habana=False")
def test_gaudi_paths_refuse_off_gaudi(classes, tmp_path):
    _, _, arguments_cls = classes
    # use_habana=True needs Gaudi software: refused before Optimum-Habana touches the device
    on_hpu = arguments_cls(
        output_dir=str(tmp_path), use_habana=True, use_lazy_mode=False, use_cpu=True, report_to=[]
    )
    with pytest.raises(ValueError, match="habana_frameworks is not installed.*CPU dry run"):
        gaudi.gaudi_trainer(_model(), on_hpu, train_dataset=Tokens())
    with pytest.raises(ValueError, match="habana_frameworks is not installed"):
        gaudi.gaudi_trainer(_model(), output_dir=str(tmp_path))  # default args: use_habana
    # lazy mode without use_habana: Optimum-Habana's own arguments refuse it; set afterwards,
    # paca does
    with pytest.raises(ValueError, match="cannot be used without `--use_habana`"):
        arguments_cls(output_dir=str(tmp_path), use_habana=False, use_lazy_mode=True, use_cpu=True)
    args = _dry_run_args(arguments_cls, tmp_path)
    args.use_lazy_mode = True
    with pytest.raises(ValueError, match="use_lazy_mode=True with use_habana=False"):
        gaudi.gaudi_trainer(_model(), args, train_dataset=Tokens())


def test_gaudi_example_runs_as_a_cpu_dry_run(tmp_path):
    command = [sys.executable, str(EXAMPLE), "--trainer", "gaudi", "--tiny", "--cpu"]
    command += ["--max-steps", "4", "--r", "4", "--batch-size", "4"]
    command += ["--output", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run of the Gaudi script" in result.stderr
    adapter = tmp_path / "out" / "adapter"
    assert {"adapter.safetensors", "gaudi_config.json"} <= {p.name for p in adapter.iterdir()}
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert (checkpoint / "adapter.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
