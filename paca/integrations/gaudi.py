"""Intel Gaudi (HPU): training a PaCA model with the Hugging Face Trainer or Optimum-Habana.

Two paths, both on Intel's Gaudi software 1.24 images (``docker/gaudi.Dockerfile``):

* Recommended: plain ``transformers.Trainer`` (or ``paca.Trainer``) on ``hpu`` in eager mode
  (``PT_HPU_LAZY_MODE=0``, optionally with ``torch.compile``): ``hpu_trainer``. Eager mode is
  Intel's default execution path; lazy mode is legacy.
* Optimum-Habana's ``GaudiTrainer`` (final release 1.21.2, transformers 4.55.x), lazy or eager:
  ``gaudi_trainer``. Optimum-Habana reached end of life; use it where a recipe needs it.

Without a Gaudi, ``gaudi_trainer`` with ``GaudiTrainingArguments(use_cpu=True, use_habana=False,
use_lazy_mode=False)`` runs Optimum-Habana's own training loop on the CPU: a dry run of a Gaudi
script (``optimum_habana()`` gives its classes; the notes above it say what paca works around).

Order matters on Gaudi: ``GaudiConfig`` refuses to declare its autocast op lists once
``habana_frameworks.torch.core`` is imported, and that module is imported by anything that
touches an HPU. So ``enable`` adapts the model without touching the device (the HPU kernels are
registered; the Trainer moves the model), and the helpers here never import
``habana_frameworks`` or ``optimum.habana`` before they are asked to build a trainer.

Lazy mode: paca never calls ``mark_step`` and never synchronises with the host inside a forward
or backward; merged mode writes its columns in the optimizer step (a global step hook), so the
write lands in the same graph as the step, before the ``mark_step`` the trainer issues after it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Iterator
from types import ModuleType

import transformers
from torch import nn

from paca import backends
from paca.errors import MissingDependency, PacaError
from paca.integrations.hf import AdapterCheckpoints, Trainer
from paca.model import enable as paca_enable

LAZY_ENV = "PT_HPU_LAZY_MODE"


def enable(model: nn.Module, **paca_settings) -> nn.Module:
    """``paca.enable`` for a model that a Trainer will move to ``hpu``.

    Registers the HPU kernels and adapts the model where it is (usually the CPU), without
    importing ``habana_frameworks``, so a ``GaudiConfig`` built afterwards still works.
    ``paca_settings`` are those of ``paca.enable`` except ``device``.
    """
    if "device" in paca_settings:
        raise PacaError(
            "paca.integrations.gaudi.enable leaves the device to the Trainer: drop device="
            f"{paca_settings['device']!r} (or call paca.enable(model, device='hpu') yourself)"
        )
    backends.load("hpu")
    current = next((p.device for p in model.parameters()), None)
    return paca_enable(
        model, device=str(current) if current is not None else "cpu", **paca_settings
    )


def check_execution_mode(lazy: bool) -> None:
    """Makes sure the Habana bridge will run (or runs) in the mode asked for.

    ``PT_HPU_LAZY_MODE`` is read when ``habana_frameworks`` is imported: before that, an unset
    variable is set here; afterwards, a mismatch is an error that says how to fix it.
    """
    want = "1" if lazy else "0"
    value = os.environ.get(LAZY_ENV)
    imported = "habana_frameworks.torch" in sys.modules
    if value is None and not imported:
        os.environ[LAZY_ENV] = want
        return
    if value is not None and value != want:
        mode = "lazy" if lazy else "eager"
        raise RuntimeError(
            f"{LAZY_ENV}={value} but {mode} mode was asked for: start the process with "
            f"{LAZY_ENV}={want} (it is read when habana_frameworks is imported)"
        )


def hpu_trainer(model: nn.Module, args, **trainer_kwargs) -> Trainer:
    """``paca.Trainer`` (adapter-only checkpoints) for the plain-Trainer path on HPU, eager mode.

    ``args`` are ordinary ``transformers.TrainingArguments``; on a Gaudi machine the Trainer
    picks the ``hpu`` device by itself.
    """
    check_execution_mode(lazy=False)
    return Trainer(model=model, args=args, **trainer_kwargs)


# --- Optimum-Habana off Gaudi: the CPU dry run --------------------------------------------------
#
# Optimum-Habana 1.21.2's own training loop runs on a CPU (GaudiTrainingArguments(use_cpu=True,
# use_habana=False, use_lazy_mode=False)), which makes a Gaudi script checkable on any machine.
# Three things in it assume a Gaudi although none of them is Gaudi hardware; paca gets past them
# here, and only here:
#
# 1. ``import optimum.habana`` runs ``check_synapse_version`` in the package ``__init__``, which
#    parses ``pip list | grep habana-torch-plugin`` and raises IndexError when the plugin is
#    absent (upstream issue 1467). Off Gaudi (``habana_frameworks`` not installed), the package's
#    own ``__init__`` is run with that one check replaced by a warning (``_import_off_gaudi``).
#    Process-wide, as any import is; on a machine with ``habana_frameworks`` the plain import
#    runs, check included.
# 2. ``GaudiTrainer.log`` is transformers' ``Trainer.log`` plus ``get_hpu_memory_stats``, which
#    imports ``habana_frameworks``; the dry-run trainer logs with transformers' own ``log``.
# 3. For LLaMA-family models its training and evaluation loops read four Gaudi-only fields of
#    ``model.generation_config`` (``GAUDI_GENERATION_FIELDS``), which exist only once
#    ``adapt_transformers_to_gaudi`` (run by ``GaudiTrainingArguments`` on a Gaudi) replaced
#    transformers' GenerationConfig; the dry-run trainer sets the missing ones to False (off)
#    for the duration of each loop and removes them afterwards.
#
# 2 and 3 live in ``_CpuDryRun``, a mixin that only the trainer built with ``use_habana=False``
# has: a Gaudi run's trainer class does not contain it. No ``habana_frameworks`` module or
# package metadata is faked; what the dry run cannot check is listed in docs/distributed.md.

GAUDI_GENERATION_FIELDS = (
    "attn_softmax_bf16",
    "use_flash_attention",
    "flash_attention_recompute",
    "flash_attention_causal_mask",
)


def _on_gaudi_software() -> bool:
    """Whether Intel's Gaudi software (``habana_frameworks``) is installed; imports nothing."""
    return importlib.util.find_spec("habana_frameworks") is not None


def _synapse_check_skipped() -> None:
    warnings.warn(
        "optimum-habana's SynapseAI version check was skipped: habana_frameworks is not "
        "installed, so this is not a Gaudi machine; GaudiTrainer can only run as a CPU dry run "
        "here (GaudiTrainingArguments(use_cpu=True, use_habana=False, use_lazy_mode=False))",
        stacklevel=2,
    )


def _import_off_gaudi() -> ModuleType:
    """``optimum.habana``, its ``__init__`` run with ``check_synapse_version`` replaced.

    The package module is made from its real spec and put in ``sys.modules`` before its
    ``__init__`` runs (what the import system itself does), so ``optimum.habana.utils`` can be
    imported first and its ``check_synapse_version`` replaced while the ``__init__`` runs.
    """
    spec = importlib.util.find_spec("optimum.habana")
    if spec is None:
        raise ModuleNotFoundError("No module named 'optimum.habana'", name="optimum.habana")
    package = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = package
    try:
        utils = importlib.import_module("optimum.habana.utils")
        check = getattr(utils, "check_synapse_version", None)
        if check is not None:
            utils.check_synapse_version = _synapse_check_skipped
        try:
            spec.loader.exec_module(package)
        finally:
            if check is not None:
                utils.check_synapse_version = check
    except BaseException:
        del sys.modules[spec.name]
        raise
    # what the import system does after loading: the submodules (some were imported before this
    # package object existed, by an earlier failed import) and the package as attributes
    for name, module in list(sys.modules.items()):
        parent, _, child = name.rpartition(".")
        if parent == spec.name and module is not None and not hasattr(package, child):
            setattr(package, child, module)
    sys.modules["optimum"].habana = package
    return package


def optimum_habana() -> tuple[type, type, type]:
    """Optimum-Habana's own ``(GaudiConfig, GaudiTrainer, GaudiTrainingArguments)``.

    On a Gaudi machine this is ``from optimum.habana import ...``. Off Gaudi, where that import
    fails in Optimum-Habana's SynapseAI version check, the package is imported with that check
    skipped (a warning says so), so a Gaudi script can build its arguments and run
    ``gaudi_trainer`` as a CPU dry run. Imports nothing before it is called.

    Raises:
        MissingDependency: optimum-habana is not installed, or fails to import.
    """
    try:
        if "optimum.habana" not in sys.modules and not _on_gaudi_software():
            _import_off_gaudi()
        from optimum.habana import GaudiConfig, GaudiTrainer, GaudiTrainingArguments
    except (ImportError, IndexError) as exc:  # IndexError: its version check, on Gaudi too
        raise MissingDependency(
            "optimum-habana",
            "GaudiTrainer",
            "hpu",
            detail="optimum-habana 1.21.2 at the pins of docker/gaudi-pins.txt (pip install -c "
            "docker/gaudi-pins.txt 'paca[hpu]'); it cannot be imported here "
            f"({type(exc).__name__}: {exc}). Without it, use hpu_trainer (the plain Trainer in "
            "eager mode)",
        ) from exc
    return GaudiConfig, GaudiTrainer, GaudiTrainingArguments


class _CpuDryRun:
    """Mixin for a ``GaudiTrainer`` built with ``use_habana=False`` (points 2 and 3 above)."""

    def log(self, logs: dict[str, float], start_time: float | None = None, *args, **kwargs):
        # transformers' log is GaudiTrainer's without get_hpu_memory_stats (no HPU to ask);
        # end_time, which only GaudiTrainer's log takes, is dropped: transformers' log times the
        # speed metrics itself
        return transformers.Trainer.log(self, logs, start_time)

    @contextlib.contextmanager
    def _gaudi_generation_fields(self) -> Iterator[None]:
        config = getattr(self.model, "generation_config", None)
        if config is None:
            yield
            return
        missing = [field for field in GAUDI_GENERATION_FIELDS if not hasattr(config, field)]
        for field in missing:
            setattr(config, field, False)
        try:
            yield
        finally:
            for field in missing:
                if field in vars(config):
                    delattr(config, field)

    def _inner_training_loop(self, *args, **kwargs):
        with self._gaudi_generation_fields():
            return super()._inner_training_loop(*args, **kwargs)

    def evaluation_loop(self, *args, **kwargs):
        with self._gaudi_generation_fields():
            return super().evaluation_loop(*args, **kwargs)


def gaudi_trainer(
    model: nn.Module,
    args=None,
    gaudi_config=None,
    *,
    output_dir: str | None = None,
    lazy: bool = False,
    **trainer_kwargs,
):
    """Optimum-Habana's ``GaudiTrainer`` with paca's adapter-only checkpoints.

    On a Gaudi, ``args.use_habana=True`` trains on the HPU. Off Gaudi,
    ``GaudiTrainingArguments(use_cpu=True, use_habana=False, use_lazy_mode=False)`` runs
    Optimum-Habana's own training loop on the CPU: a dry run of a Gaudi script (a warning says
    so; see the notes above ``optimum_habana`` for what paca works around, and only then).

    Args:
        model: a model adapted with ``enable`` (or ``paca.enable``).
        args: ``GaudiTrainingArguments``; default: built from ``output_dir`` with
            ``use_habana=True`` and ``use_lazy_mode=lazy``.
        gaudi_config: a ``GaudiConfig``; default: fused AdamW and fused gradient clipping
            (Habana's kernels, used only with ``use_habana``), autocast as ``args.bf16`` says.
            Saved in every checkpoint.
        lazy (bool): lazy mode (legacy); default eager. Must agree with ``PT_HPU_LAZY_MODE``.
        trainer_kwargs: the rest of ``GaudiTrainer``'s arguments (datasets, collator, ...).

    Raises:
        MissingDependency: optimum-habana cannot be imported.
        PacaError: ``use_habana`` without Gaudi software, or lazy mode without ``use_habana``.
        RuntimeError: ``PT_HPU_LAZY_MODE`` disagrees with the mode asked for (Gaudi runs).
    """
    gaudi_config_cls, gaudi_trainer_cls, arguments_cls = optimum_habana()
    if args is None and output_dir is None:
        raise PacaError("gaudi_trainer needs args= (GaudiTrainingArguments) or output_dir=")
    use_habana = args is None or bool(getattr(args, "use_habana", False))
    if use_habana and not _on_gaudi_software():
        raise PacaError(
            f"{'args.use_habana=True' if args is not None else 'args=None (use_habana=True)'} "
            "but habana_frameworks is not installed (no Gaudi software here): run inside "
            "docker/gaudi.Dockerfile on a Gaudi machine, or pass GaudiTrainingArguments("
            "use_cpu=True, use_habana=False, use_lazy_mode=False) for a CPU dry run"
        )
    if args is None:
        args = arguments_cls(output_dir=output_dir, use_habana=True, use_lazy_mode=lazy)
    bases: tuple[type, ...] = (AdapterCheckpoints, gaudi_trainer_cls)
    if use_habana:
        check_execution_mode(lazy=bool(args.use_lazy_mode))
    else:
        if args.use_lazy_mode:
            raise PacaError(
                "args.use_lazy_mode=True with use_habana=False: lazy mode exists only on a "
                "Gaudi; pass use_lazy_mode=False for a CPU dry run"
            )
        warnings.warn(
            "GaudiTrainer runs with use_habana=False: Optimum-Habana's training loop on "
            f"{args.device.type}, a dry run of the Gaudi script; nothing runs on a Gaudi "
            "(lazy mode, HPU graphs, Habana's fused optimizer and autocast are not exercised)",
            stacklevel=2,
        )
        bases = (AdapterCheckpoints, _CpuDryRun, gaudi_trainer_cls)
    if gaudi_config is None:
        gaudi_config = gaudi_config_cls(
            use_fused_adam=True, use_fused_clip_norm=True, use_torch_autocast=bool(args.bf16)
        )

    def save_extras(self, output_dir: str) -> None:
        self.gaudi_config.save_pretrained(output_dir)

    trainer_cls = type(
        "PacaGaudiTrainer",
        bases,
        {"__doc__": "GaudiTrainer whose checkpoints hold the PaCA adapter and the Gaudi config.",
         "__module__": __name__, "_save_extras": save_extras},
    )  # fmt: skip
    return trainer_cls(model=model, gaudi_config=gaudi_config, args=args, **trainer_kwargs)
