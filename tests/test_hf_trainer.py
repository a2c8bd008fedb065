"""PaCA under the Hugging Face Trainer: adapter-only checkpoints, exact resume, gradient
accumulation and checkpointing equivalence (fp32, to 1e-6)."""

import pytest
import torch
import transformers
from conftest import Tokens, tiny_llama, trainer_settings

import paca
from paca.integrations.hf import OTHER_TRAINABLE


def _args(out, **overrides):
    return transformers.TrainingArguments(**trainer_settings(out, **overrides))


def _model(mode="merged"):
    return paca.enable(tiny_llama(), r=4, alpha=8, mode=mode, seed=1)


def _deltas(model):
    return {name: layer.delta.detach().clone() for name, layer in paca.paca_layers(model)}


def _assert_same(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tol, msg=name)


class _StopAt(transformers.TrainerCallback):
    """An interruption: ends training after ``step`` (once its checkpoint is written)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def _train(args, model=None, resume=None, stop_at=None):
    model = model if model is not None else _model()
    callbacks = [_StopAt(stop_at)] if stop_at else None
    trainer = paca.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


def _interrupted(out, model):
    """Trains ``model`` for 3 of 6 steps with a checkpoint at step 3; returns that folder."""
    _train(_args(out, save_strategy="steps", save_steps=3), model, stop_at=3)
    return out / "checkpoint-3"


@pytest.mark.parametrize("mode", ["merged", "additive"])
def test_checkpoints_hold_the_adapter_and_resume_to_the_same_adapter(tmp_path, mode):
    straight, _ = _train(_args(tmp_path / "a"), _model(mode))
    assert any(d.abs().max() > 0 for d in _deltas(straight).values())

    # stop after step 3 (a checkpoint), then resume on a fresh base model in a new Trainer
    checkpoint = _interrupted(tmp_path / "b", _model(mode))
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin", OTHER_TRAINABLE}
    payload = sum(  # delta (out x r, fp32) and idx (r, int64) per layer; header aside
        layer.delta.numel() * 4 + layer.active.idx.numel() * 8
        for _, layer in paca.paca_layers(straight)
    )
    assert (checkpoint / "adapter.safetensors").stat().st_size < payload + 8192
    resumed, trainer = _train(_args(tmp_path / "b"), _model(mode), resume=str(checkpoint))
    assert trainer.state.global_step == 6
    _assert_same(_deltas(resumed), _deltas(straight))


def test_save_model_writes_an_adapter_that_loads_onto_a_fresh_model(tmp_path):
    model, trainer = _train(_args(tmp_path))
    trainer.save_model(str(tmp_path / "final"))
    fresh = paca.load_adapter(tiny_llama(), tmp_path / "final")
    ids = Tokens()[0]["input_ids"][None]
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model.eval()(ids).logits)


def test_other_trainable_parameters_are_checkpointed_and_restored(tmp_path):
    def unfrozen():
        model = _model()
        model.model.norm.weight.requires_grad_(True)
        return model

    straight, _ = _train(_args(tmp_path / "a"), unfrozen())
    checkpoint = _interrupted(tmp_path / "b", unfrozen())
    assert (checkpoint / OTHER_TRAINABLE).is_file()
    resumed, _ = _train(_args(tmp_path / "b"), unfrozen(), resume=str(checkpoint))
    _assert_same(_deltas(resumed), _deltas(straight))
    torch.testing.assert_close(resumed.model.norm.weight, straight.model.norm.weight)
    assert not torch.equal(straight.model.norm.weight, torch.ones(32))
    with pytest.raises(ValueError, match="unfreeze the same parameters"):
        _train(_args(tmp_path / "b"), _model(), resume=str(checkpoint))


def test_gradient_accumulation_gives_the_adapter_of_the_same_effective_batch(tmp_path):
    plain, _ = _train(_args(tmp_path / "a"))
    accumulated, _ = _train(
        _args(tmp_path / "b", per_device_train_batch_size=2, gradient_accumulation_steps=2)
    )
    _assert_same(_deltas(accumulated), _deltas(plain))


@pytest.mark.parametrize("mode", ["merged", "additive"])
def test_gradient_checkpointing_gives_the_same_adapter(tmp_path, mode):
    plain, _ = _train(_args(tmp_path / "a"), _model(mode))
    model = _model(mode)
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    checkpointed, _ = _train(_args(tmp_path / "b"), model)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())
    _assert_same(_deltas(checkpointed), _deltas(plain))


def test_a_model_without_paca_keeps_the_trainers_own_checkpoints(tmp_path):
    model = tiny_llama()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith("norm.weight"))
    _train(_args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2), model)
    assert (tmp_path / "checkpoint-2" / "model.safetensors").is_file()
