"""Intel Gaudi (HPU): training a PaCA model with the Hugging Face Trainer or Optimum-Habana.

Two paths, both on Intel's Gaudi software 1.24 images (``docker/gaudi.Dockerfile``):

* Recommended: plain ``transformers.Trainer`` (or ``paca.Trainer``) on ``hpu`` in eager mode
  (``PT_HPU_LAZY_MODE=0``, optionally with ``torch.compile``): ``hpu_trainer``. Eager mode is
  Intel's default execution path; lazy mode is legacy.
* Optimum-Habana's ``GaudiTrainer`` (final release 1.21.2, transformers 4.55.x), lazy or eager:
  ``gaudi_trainer``. Optimum-Habana reached end of life; use it where a recipe needs it.

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

import os
import sys

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


def _optimum_habana():
    try:
        from optimum.habana import GaudiConfig, GaudiTrainer, GaudiTrainingArguments
    except (ImportError, IndexError) as exc:  # IndexError: its version check without Gaudi
        raise MissingDependency(
            "optimum-habana",
            "GaudiTrainer",
            "hpu",
            detail="optimum-habana 1.21.2 on a Gaudi machine with Intel's software 1.24 (pip "
            "install 'paca[hpu]' inside docker/gaudi.Dockerfile); it cannot be imported here "
            f"({type(exc).__name__}: {exc}). Without it, use hpu_trainer (the plain Trainer in "
            "eager mode)",
        ) from exc
    return GaudiConfig, GaudiTrainer, GaudiTrainingArguments


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

    Args:
        model: a model adapted with ``enable`` (or ``paca.enable``).
        args: ``GaudiTrainingArguments``; default: built from ``output_dir`` with
            ``use_habana=True`` and ``use_lazy_mode=lazy``.
        gaudi_config: a ``GaudiConfig``; default: fused AdamW and fused gradient clipping
            (Habana's kernels), autocast as ``args.bf16`` says.
        lazy (bool): lazy mode (legacy); default eager. Must agree with ``PT_HPU_LAZY_MODE``.
        trainer_kwargs: the rest of ``GaudiTrainer``'s arguments (datasets, collator, ...).
    """
    gaudi_config_cls, gaudi_trainer_cls, arguments_cls = _optimum_habana()
    if args is None:
        if output_dir is None:
            raise PacaError("gaudi_trainer needs args= (GaudiTrainingArguments) or output_dir=")
        args = arguments_cls(output_dir=output_dir, use_habana=True, use_lazy_mode=lazy)
    if not getattr(args, "use_habana", False):
        raise PacaError(
            "args.use_habana is False: GaudiTrainer would train on the CPU; pass "
            "GaudiTrainingArguments(use_habana=True, ...)"
        )
    check_execution_mode(lazy=bool(args.use_lazy_mode))
    if gaudi_config is None:
        gaudi_config = gaudi_config_cls(
            use_fused_adam=True, use_fused_clip_norm=True, use_torch_autocast=bool(args.bf16)
        )

    class PacaGaudiTrainer(AdapterCheckpoints, gaudi_trainer_cls):
        """GaudiTrainer whose checkpoints hold the PaCA adapter and the Gaudi config."""

        def _save_extras(self, output_dir: str) -> None:
            self.gaudi_config.save_pretrained(output_dir)

    return PacaGaudiTrainer(model=model, gaudi_config=gaudi_config, args=args, **trainer_kwargs)
