"""TRL's SFTTrainer with PaCA (paca.integrations.trl): adapter-only checkpoints and final
output, exact resume, fp32 deltas on a 4-bit base, gradient checkpointing and packing."""

import json

import pytest
import torch
from safetensors.torch import load_file

import paca

trl = pytest.importorskip("trl", reason="TRL (pip install 'paca[trl]')")
datasets = pytest.importorskip("datasets")
paca_trl = pytest.importorskip("paca.integrations.trl")


def _dataset(n=32):
    texts = [f"the answer {i % 5} is socket server number {i % 3}" for i in range(n)]
    return datasets.Dataset.from_dict({"text": texts})


def _config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_steps=2,
        logging_steps=1,
        report_to=[],
        max_length=32,
        seed=0,
        dataloader_num_workers=0,
        use_cpu=True,
        # SFTConfig turns bf16 autocast on by default, and accelerate then wraps the model's
        # forward in it for good: fp32 here, so outputs compare exactly
        bf16=False,
    )
    settings.update(overrides)
    return trl.SFTConfig(**settings)


def _model(folder, quantize=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    extra = {}
    if quantize:
        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32
        )
    model = AutoModelForCausalLM.from_pretrained(folder, **extra)
    return paca.enable(model, r=4), AutoTokenizer.from_pretrained(folder)


def _trainer(folder, tmp_path, quantize=None, **config):
    model, tokenizer = _model(folder, quantize)
    trainer = paca_trl.SFTTrainer(
        model=model,
        args=_config(tmp_path, **config),
        train_dataset=_dataset(),
        processing_class=tokenizer,
    )
    return trainer, model


def _deltas(model):
    return {n: layer.delta.detach().clone() for n, layer in paca.paca_layers(model)}


def _assert_close(got, want, tol=1e-6):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=tol, msg=name)


def test_checkpoints_and_output_hold_the_adapter_and_reload(tmp_path, tiny_llama_folder):
    trainer, model = _trainer(tiny_llama_folder, tmp_path / "run")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for folder in [tmp_path / "run" / "checkpoint-2", tmp_path / "run" / "checkpoint-4"]:
        assert (folder / "adapter.safetensors").is_file() and (folder / "optimizer.pt").is_file()
        assert not list(folder.glob("model*.safetensors")), "no copy of the model"
    final = tmp_path / "final"
    assert not list(final.glob("model*.safetensors"))
    size = (final / "adapter.safetensors").stat().st_size
    assert size < 0.1 * model_bytes, (size, model_bytes)
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        want = model(ids).logits
    fresh, _ = _model(tiny_llama_folder)
    paca.unload(fresh)
    paca.load_adapter(fresh, final)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_resume_gives_the_uninterrupted_adapter(tmp_path, tiny_llama_folder):
    straight, model = _trainer(tiny_llama_folder, tmp_path / "straight")
    straight.train()
    want = _deltas(model)
    first, _ = _trainer(tiny_llama_folder, tmp_path / "cut", max_steps=2)
    first.train()  # stops after the checkpoint of step 2, as an interrupted run would
    resumed, model = _trainer(tiny_llama_folder, tmp_path / "cut")
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    _assert_close(_deltas(model), want)


def test_a_4bit_base_trains_with_fp32_deltas(tmp_path, tiny_llama_folder):
    pytest.importorskip("bitsandbytes")
    trainer, model = _trainer(tiny_llama_folder, tmp_path / "q", quantize="4bit")
    deltas = [layer.delta for _, layer in paca.paca_layers(model)]
    assert {d.dtype for d in deltas} == {torch.float32}, "TRL's bf16 cast was undone"
    trainer.train()
    assert {d.dtype for d in deltas} == {torch.float32}
    assert all(d.abs().max() > 0 for d in deltas)
    saved = load_file(tmp_path / "q" / "checkpoint-4" / "adapter.safetensors")
    assert {t.dtype for n, t in saved.items() if n.endswith(".delta")} == {torch.float32}
    # what the plain SFTTrainer does to them (the cast the subclass undoes)
    from paca.integrations.hf import quantized_training

    plain, _ = _model(tiny_llama_folder, quantize="4bit")
    with quantized_training(plain):
        trl.SFTTrainer(model=plain, args=_config(tmp_path / "p"), train_dataset=_dataset())
    assert {layer.delta.dtype for _, layer in paca.paca_layers(plain)} == {torch.bfloat16}


def test_gradient_checkpointing_gives_the_same_adapter_and_packing_trains(
    tmp_path, tiny_llama_folder
):
    plain, model = _trainer(tiny_llama_folder, tmp_path / "plain")
    plain.train()
    want = _deltas(model)
    checkpointed, model = _trainer(tiny_llama_folder, tmp_path / "gc", gradient_checkpointing=True)
    checkpointed.train()
    _assert_close(_deltas(model), want, tol=1e-5)
    packed, model = _trainer(tiny_llama_folder, tmp_path / "packed", packing=True)
    packed.train()
    assert all(d.abs().max() > 0 for d in _deltas(model).values())
    state = json.loads((tmp_path / "packed" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_any_trainer_class_gets_adapter_checkpoints():
    from paca.integrations.hf import AdapterCheckpoints, with_adapter_checkpoints

    dpo = with_adapter_checkpoints(trl.DPOTrainer)
    assert issubclass(dpo, AdapterCheckpoints) and issubclass(dpo, trl.DPOTrainer)
    assert with_adapter_checkpoints(dpo) is dpo
    with pytest.raises(ValueError, match="needs a transformers.Trainer subclass"):
        with_adapter_checkpoints(dict)
