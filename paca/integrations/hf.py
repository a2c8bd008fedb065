"""Hugging Face ``transformers.Trainer`` with PaCA models.

``paca.Trainer`` is ``transformers.Trainer`` with adapter-only checkpoints. The plain Trainer
trains a PaCA model unchanged, but its checkpoints hold a full copy of the model (it saves
``save_pretrained`` of whatever it trains) and it resumes only from such files; for a 7B model
that is 14 GB per checkpoint for a few MB of adapter. ``paca.Trainer`` writes the adapter
(``paca.save_adapter``), any other trainable parameter and the optimizer, scheduler and RNG
state the Trainer saves anyway, and resumes from exactly that.

``DropBackwardCallback`` keeps ``paca.drop_backward`` in step with the Trainer (resume, the
sensitivity measurement).

Imports: ``transformers``, ``paca.adapters``, ``paca.model``, ``paca.dropbp``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator

import torch
import transformers
import transformers.trainer_utils as trainer_utils
from safetensors.torch import load_file, save_file
from torch import nn

from paca import dropbp
from paca.adapters import ADAPTER_WEIGHTS, load_adapter, save_adapter
from paca.adapters.common import atomic_file, cpu_tensors, move_into_place
from paca.errors import PacaError
from paca.model import active_adapter, adapter_copies, adapter_layers, is_enabled

# trainable parameters that are neither a delta nor in a module paca trains in full
OTHER_TRAINABLE = "other_trainable.safetensors"

# transformers' marker for "trainable adapters are attached" (set by its own PEFT integration)
_ADAPTERS_MARK = "_hf_peft_config_loaded"
# where a checkpoint is written before it is moved into place (no checkpoint-N name, so the
# Trainer's get_last_checkpoint never takes a half-written one)
STAGING = ".paca-staging"


@contextlib.contextmanager
def quantized_training(model: nn.Module) -> Iterator[nn.Module]:
    """Lets ``transformers.Trainer`` accept a quantized model that carries PaCA adapters.

    The Trainer refuses a quantized model (``BitsAndBytesConfig``) unless a PEFT adapter is
    attached; it recognises those by ``PeftModel`` or by transformers' adapter marker. PaCA's
    ``delta`` parameters are trainable adapters too, so the marker is set while the Trainer is
    built (``with quantized_training(model): trainer = Trainer(model, ...)``) and removed
    afterwards, so ``save_pretrained`` keeps its usual behaviour. Refuses a model without PaCA
    adapters, which the Trainer would rightly refuse.
    """
    if not getattr(model, "is_quantized", False):
        yield model
        return
    if not is_enabled(model):
        raise PacaError(
            f"{type(model).__name__} is quantized and has no PaCA adapters: call paca.enable "
            "first (only the adapters of a quantized model can be trained)"
        )
    own = vars(model)  # the instance's own attributes (transformers' default is on the class)
    had, previous = _ADAPTERS_MARK in own, own.get(_ADAPTERS_MARK)
    setattr(model, _ADAPTERS_MARK, True)
    try:
        yield model
    finally:
        if had:
            setattr(model, _ADAPTERS_MARK, previous)
        else:
            delattr(model, _ADAPTERS_MARK)


def _deltas(model: nn.Module) -> dict[int, nn.Parameter]:
    """The active adapter's deltas (what a Trainer trains), by id."""
    name = active_adapter(model)
    if name is None:
        return {}
    return {id(adapter.delta): adapter.delta for _, _, adapter in adapter_layers(model, name)}


def _other_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters the adapter file does not hold (e.g. a norm the user unfroze)."""
    active = active_adapter(model)
    held = set(_deltas(model))
    if active is not None:
        held |= {id(p) for _, m in adapter_copies(model, active) for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in held}


def _is_sharded(model: nn.Module) -> bool:
    return any(hasattr(p, "device_mesh") for p in model.parameters() if p.requires_grad)


class AdapterCheckpoints:
    """Mixin for ``transformers.Trainer`` and its subclasses (``GaudiTrainer``, TRL's trainers):
    checkpoints hold the PaCA adapter instead of the model, and a quantized base is accepted.
    See ``Trainer``; ``with_adapter_checkpoints`` applies it to any Trainer class.

    Some subclasses change trainable parameters while they are built: TRL casts every
    trainable parameter of a quantized model to bf16 (QLoRA's recipe for LoRA weights). PaCA's
    deltas stay in fp32 (their gradients are fp32 whatever the compute dtype), so the mixin puts
    back the exact values and dtypes the deltas had before the Trainer was built.
    """

    def __init__(self, model=None, *args, **kwargs):
        before = {}
        if model is not None:
            before = {key: (p, p.detach().clone()) for key, p in _deltas(model).items()}
        with quantized_training(model) if model is not None else contextlib.nullcontext():
            super().__init__(model, *args, **kwargs)
        for param, value in before.values():
            if param.dtype != value.dtype:  # cast by the Trainer: the fp32 values, unrounded
                param.data = value

    def _save_extras(self, output_dir: str) -> None:
        """Files a subclass saves beside the adapter (the Gaudi config, for instance)."""

    def _adapter_model(self, model: nn.Module | None = None) -> nn.Module | None:
        """The (unwrapped) model if it has PaCA adapters that paca's files can hold."""
        model = self.accelerator.unwrap_model(model if model is not None else self.model)
        return model if is_enabled(model) and not _is_sharded(model) else None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        model = self._adapter_model()
        if model is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:
            return None
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        # a checkpoint keeps what the Trainer has, NaN included (the plain Trainer's behaviour)
        save_adapter(model, output_dir, allow_non_finite=True)
        other = _other_trainable(model)
        if other:
            with atomic_file(os.path.join(output_dir, OTHER_TRAINABLE)) as tmp:
                save_file(cpu_tensors(other), str(tmp))
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
        self._save_extras(output_dir)
        return None

    def _save_checkpoint(self, model, trial) -> None:
        """The Trainer's checkpoint, written into a staging folder and moved into place as
        ``checkpoint-N`` in one rename: a kill or a full disk mid-write never leaves a
        ``checkpoint-N`` that ``resume_from_checkpoint`` would take for a complete one, and the
        previous checkpoints are rotated out only once the new one is in place."""
        run_dir = self._get_output_dir(trial=trial)
        staging = os.path.join(run_dir, STAGING)
        # Under several processes every one of them takes part (the Trainer gathers state and
        # each writes its own RNG state), but only the main one makes, moves and removes the
        # folders, between barriers; the folder must be shared (one machine, or a shared
        # file system across machines).
        main = self.is_world_process_zero()
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            os.makedirs(staging)
        self.accelerator.wait_for_everyone()
        self._get_output_dir = lambda trial=None: staging  # what the Trainer writes into
        try:
            super()._save_checkpoint(model, trial)
        finally:
            del self._get_output_dir  # the class's method again
        self.accelerator.wait_for_everyone()
        name = f"{trainer_utils.PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        best = self.state.best_model_checkpoint
        if best and os.path.dirname(best) == staging:
            self.state.best_model_checkpoint = os.path.join(run_dir, os.path.basename(best))
        if main:
            # replaces checkpoint-N if the same step is saved again (a resumed run)
            move_into_place(os.path.join(staging, name), os.path.join(run_dir, name))
            shutil.rmtree(staging, ignore_errors=True)
            self._rotate_into(run_dir)
        self.accelerator.wait_for_everyone()

    def _rotate_into(self, run_dir: str) -> None:
        if not self.args.should_save:
            return
        rotate = getattr(trainer_utils, "rotate_checkpoints", None)
        if rotate is not None:  # transformers 5
            rotate(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        else:  # transformers 4.x: a method of the Trainer
            self._rotate_checkpoints(use_mtime=True, output_dir=run_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        target = self._adapter_model(model)
        if target is None or not os.path.isfile(
            os.path.join(resume_from_checkpoint, ADAPTER_WEIGHTS)
        ):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_into(target, resume_from_checkpoint)
        return None

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        model = self._adapter_model()
        if model is None or not best or not os.path.isfile(os.path.join(best, ADAPTER_WEIGHTS)):
            return super()._load_best_model()
        _load_into(model, best)
        return None


class Trainer(AdapterCheckpoints, transformers.Trainer):
    """``transformers.Trainer`` whose checkpoints hold the PaCA adapter instead of the model.

    Same arguments as ``transformers.Trainer``. For a model with PaCA adapters, each checkpoint
    (``save_steps``) and ``save_model`` write ``adapter_config.json`` and
    ``adapter.safetensors`` of the active adapter, ``other_trainable.safetensors`` if other
    parameters are trainable, and the Trainer's own optimizer, scheduler, RNG and state files;
    ``resume_from_checkpoint`` and ``load_best_model_at_end`` load them back in place. A
    quantized model with PaCA adapters is accepted (see ``quantized_training``). Models without
    PaCA, and sharded (FSDP) models, whose deltas are DTensors, get the Trainer's own behaviour.
    """


class DropBackwardCallback(transformers.TrainerCallback):
    """Keeps ``paca.drop_backward`` in step with a ``transformers.Trainer``.

    The drop pattern of each step follows ``state.global_step``, so a resumed run drops what the
    uninterrupted one would have dropped. With ``sensitivity_at`` (a fraction of ``max_steps``,
    DropBP's authors use about 0.1), the callback measures every branch's sensitivity once, at
    that step, on the step's last micro-batch, and sets per-branch rates with the same
    FLOP-weighted mean (``DropBackward.set_sensitivity``). Costs one forward and backward per
    branch, once.
    """

    def __init__(self, sensitivity_at: float | None = None):
        if sensitivity_at is not None and not 0.0 < sensitivity_at < 1.0:
            raise PacaError(f"sensitivity_at={sensitivity_at}: use a fraction in (0, 1), e.g. 0.1")
        self.sensitivity_at = sensitivity_at
        self.sensitivity: dict[str, float] | None = None
        self._batch = None
        self._hook = None

    @staticmethod
    def _controller(model):
        controller = dropbp.get(model) if model is not None else None
        if controller is None:
            raise PacaError(
                "DropBackwardCallback needs a model with paca.drop_backward(model, ...) applied"
            )
        return controller

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        controller = self._controller(model)
        controller.steps = state.global_step
        controller.next_pattern()
        if self.sensitivity_at is not None and self.sensitivity is None:

            def keep(module, positional, named):
                if module.training and torch.is_grad_enabled():
                    self._batch = dict(named)

            self._hook = model.register_forward_pre_hook(keep, with_kwargs=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        controller = self._controller(model)
        due = max(1, round(self.sensitivity_at * state.max_steps)) if self.sensitivity_at else None
        if due is not None and self.sensitivity is None and state.global_step >= due:
            self._hook.remove()
            batch, self._batch = self._batch, None
            self.sensitivity = dropbp.sensitivities(model, batch)
            controller.set_sensitivity(self.sensitivity)
        if controller.steps != state.global_step:  # an optimizer step was skipped (fp16 overflow)
            controller.steps = state.global_step
            controller.next_pattern()

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()


def with_adapter_checkpoints(trainer_class: type) -> type:
    """``trainer_class`` (any ``transformers.Trainer`` subclass: TRL's ``DPOTrainer``,
    ``GRPOTrainer``, ``RewardTrainer``, your own) with paca's adapter-only checkpoints, exact
    resume, quantized-base acceptance and fp32 deltas (``AdapterCheckpoints``).

    Example:
        ``PacaDPOTrainer = with_adapter_checkpoints(trl.DPOTrainer)``

    Raises:
        PacaError: ``trainer_class`` is not a ``transformers.Trainer`` subclass.
    """
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, transformers.Trainer)):
        raise PacaError(
            f"with_adapter_checkpoints needs a transformers.Trainer subclass, got {trainer_class!r}"
        )
    if issubclass(trainer_class, AdapterCheckpoints):
        return trainer_class
    return type(
        f"Paca{trainer_class.__name__}",
        (AdapterCheckpoints, trainer_class),
        {"__doc__": f"{trainer_class.__name__} with PaCA adapter-only checkpoints.",
         "__module__": trainer_class.__module__},
    )  # fmt: skip


def _load_into(model: nn.Module, directory: str) -> None:
    """The adapter (and other trainable parameters) of a checkpoint, into ``model`` in place."""
    load_adapter(model, directory)
    other = _other_trainable(model)
    path = os.path.join(directory, OTHER_TRAINABLE)
    saved = load_file(path) if os.path.isfile(path) else {}
    if set(saved) != set(other):
        raise PacaError(
            f"checkpoint {directory} holds trainable parameters {sorted(saved)} but the model "
            f"trains {sorted(other)} besides the adapter: unfreeze the same parameters as in "
            "the run that wrote it"
        )
    with torch.no_grad():
        for name, value in saved.items():
            other[name].copy_(value)
