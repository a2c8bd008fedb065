"""enable / merge / unload / disabled over whole models (tiny LLaMA, GPT-2, BERT from configs)."""

import copy

import pytest
import torch
from conftest import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch, train_lm
from torch import nn
from transformers.pytorch_utils import Conv1D

import paca
from paca.layer import PacaLinear, TrainedCopy


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, state, flags):
    assert not any(isinstance(m, (PacaLinear, TrainedCopy)) for m in model.modules())
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert paca.get_state(model) is None


def train(model, steps=8, lr=1e-2):
    model.train()
    losses = train_lm(model, token_batch(), steps, lr)
    model.eval()
    return losses


@pytest.mark.parametrize("mode", ["merged", "additive"])
def test_llama_defaults_equal_base_at_init_and_train(mode):
    model = tiny_llama()
    ids = token_batch()
    base = model(ids).logits.detach()
    assert paca.enable(model, r=4, mode=mode) is model
    layers = paca.paca_layers(model)
    assert len(layers) == 2 * 7
    assert {n.rsplit(".", 1)[-1] for n, _ in layers} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert all(layer.mode == mode for _, layer in layers)
    assert torch.equal(model(ids).logits, base), "the adapted model must equal the base at step 0"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".delta") for n in trainable)
    frozen_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad
    }
    losses = train(model)
    assert losses[-1] < losses[0] - 0.05, losses
    assert all(layer.delta.abs().sum() > 0 for _, layer in layers), (
        "every adapter must receive gradients"
    )
    paca.unload(model)
    # merged mode wrote into the weights and unload restored them: bit-exact base again
    for n, p in model.named_parameters():
        key = n
        if key not in frozen_before:
            parts = n.split(".")
            key = ".".join(parts[:-1] + ["base_layer", parts[-1]])
        assert torch.equal(p, frozen_before[key]), n
    assert torch.equal(model(ids).logits, base)


def test_gpt2_conv1d_targets_train_and_merge():
    model = tiny_gpt2()
    ids = token_batch()
    base = model(ids).logits.detach()
    paca.enable(model, r=4)
    layers = paca.paca_layers(model)
    assert len(layers) == 2 * 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert all(
        isinstance(layer.base_layer, Conv1D) and layer.mode == "merged" for _, layer in layers
    )
    assert torch.equal(model(ids).logits, base)
    losses = train(model)
    assert losses[-1] < losses[0]
    adapted = model(ids).logits.detach()
    paca.merge(model)
    assert not paca.paca_layers(model)
    assert isinstance(model.transformer.h[0].attn.c_attn, Conv1D)
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_bert_classifier_trains_head_and_encoder_layers():
    model = tiny_bert_classifier()
    ids = token_batch()
    labels = torch.tensor([0, 2])
    base = model(ids).logits.detach()
    paca.enable(model, r=4)
    names = [n for n, _ in paca.paca_layers(model)]
    assert len(names) == 2 * 6 and not any("pooler" in n for n in names)
    assert isinstance(model.classifier, TrainedCopy)
    assert paca.get_config(model).trainable_modules == ["classifier"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    assert not torch.equal(model.classifier.trained.weight, model.classifier.original.weight)
    assert not torch.allclose(model(ids).logits, base)
    with paca.disabled(model):  # encoder layers and the original head: the base model
        assert torch.equal(model(ids).logits, base)
    trained_logits = model(ids).logits.detach()
    paca.merge(model)  # keeps the trained head
    assert type(model.classifier) is nn.Linear
    torch.testing.assert_close(model(ids).logits, trained_logits, rtol=1e-5, atol=1e-5)


def test_all_linear_skips_output_head_and_regex_and_exclude():
    model = tiny_llama()
    paca.enable(model, r=2, target_modules="all-linear", exclude_modules=["down_proj"])
    names = [n for n, _ in paca.paca_layers(model)]
    assert "lm_head" not in names and not any(n.endswith("down_proj") for n in names)
    assert len(names) == 2 * 6
    paca.unload(model)
    paca.enable(model, r=2, target_modules=r".*layers\.1\.self_attn\.(q|v)_proj")
    assert [n for n, _ in paca.paca_layers(model)] == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(r=0), "r must be a positive integer, got r=0"),
        (dict(r=-3), "got r=-3"),
        (
            dict(r=40, target_modules=["q_proj", "down_proj"]),
            r"r=40 exceeds in_features=32 of model.layers.0.self_attn.q_proj; choose r <= 32",
        ),
        (dict(device="tpu"), "device='tpu' is not a device"),
        (
            dict(target_modules=["nope"]),
            r"matches no linear layer of LlamaForCausalLM; its linear layers end in",
        ),
        (dict(target_modules="q_proj"), "A string is a regular expression"),
        (
            dict(target_modules=["mlp"]),
            "target model.layers.0.mlp is a LlamaMLP, which paca cannot adapt; it adapts nn.Linear",
        ),
        (dict(mode="fast"), "mode='fast' is not one of"),
        (dict(selection="best"), "selection='best' is unknown"),
        (
            dict(trainable_modules=["classifier"]),
            "trainable_modules entry 'classifier' matches no module",
        ),
        (dict(alpha=0), "alpha must be > 0"),
    ],
)
def test_bad_input_is_a_clear_error_and_leaves_the_model_unchanged(kwargs, message):
    model = tiny_llama()
    state = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=message):
        paca.enable(model, **kwargs)
    assert_unchanged(model, state, flags)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_cuda_is_refused_before_anything_changes():
    model = tiny_llama()
    state = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError,
        match=r"device='cuda' is not available here: torch.cuda.is_available\(\) is False",
    ):
        paca.enable(model, device="cuda")
    assert_unchanged(model, state, flags)


def test_unknown_architecture_needs_targets():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(
        ValueError,
        match="no default target_modules for a Sequential; pass target_modules='all-linear'",
    ):
        paca.enable(model)
    paca.enable(model, r=2, target_modules=["0", "2"])
    assert len(paca.paca_layers(model)) == 2


def test_enabling_twice_is_refused():
    model = paca.enable(tiny_llama(), r=2)
    with pytest.raises(ValueError, match="already has 14 PaCA layers; call paca.unload"):
        paca.enable(model, r=2)


def test_config_and_settings_are_exclusive():
    with pytest.raises(ValueError, match="either config= or keyword settings"):
        paca.enable(tiny_llama(), r=2, config=paca.PacaConfig(r=4))
    model = paca.enable(tiny_llama(), config=paca.PacaConfig(r=4, alpha=8))
    assert all(layer.r == 4 and layer.scaling == 2.0 for _, layer in paca.paca_layers(model))


def test_failure_midway_rolls_back(monkeypatch):
    model = tiny_llama()
    state = snapshot(model)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    built = []
    original_init = PacaLinear.__init__

    def flaky_init(self, *args, **kwargs):
        if len(built) == 5:
            raise RuntimeError("out of memory (simulated)")
        built.append(1)
        original_init(self, *args, **kwargs)

    monkeypatch.setattr(PacaLinear, "__init__", flaky_init)
    with pytest.raises(RuntimeError, match="simulated"):
        paca.enable(model, r=2)
    assert_unchanged(model, state, flags)


def test_merge_gives_plain_layers_with_identical_outputs_and_unload_restores():
    model = tiny_llama()
    ids = token_batch()
    base_state = snapshot(model)
    paca.enable(model, r=4, mode="additive")
    train(model, steps=3)
    adapted = model(ids).logits.detach()
    merged = paca.merge(model)
    assert merged is model
    assert all(type(m) is not PacaLinear for m in model.modules())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    torch.testing.assert_close(model(ids).logits, adapted, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in model.parameters()), "flags as before enable"
    assert not torch.equal(
        model.model.layers[0].self_attn.q_proj.weight,
        base_state["model.layers.0.self_attn.q_proj.weight"],
    )
    with pytest.warns(UserWarning, match="no PaCA adapters; nothing to merge"):
        paca.merge(model)


def test_merge_refuses_non_finite_adapter_and_keeps_the_model():
    model = paca.enable(tiny_llama(), r=2)
    layer = dict(paca.paca_layers(model))["model.layers.1.mlp.up_proj"]
    with torch.no_grad():
        layer.delta[0, 0] = float("nan")
    before = snapshot(model)
    with pytest.raises(
        ValueError, match="model.layers.1.mlp.up_proj: delta holds NaN or inf; refusing"
    ):
        paca.merge(model)
    after = model.state_dict()
    assert len(paca.paca_layers(model)) == 14
    assert all(torch.equal(after[k], before[k]) for k in before if not k.endswith("delta"))


def test_disabled_nests_and_survives_exceptions():
    model = tiny_llama()
    ids = token_batch()
    base = model(ids).logits.detach()
    paca.enable(model, r=4)
    train(model, steps=2)
    adapted = model(ids).logits.detach()
    assert not torch.equal(adapted, base)
    with paca.disabled(model):
        assert torch.equal(model(ids).logits, base)
        with paca.disabled(model):
            assert torch.equal(model(ids).logits, base)
        assert torch.equal(model(ids).logits, base)
    assert torch.equal(model(ids).logits, adapted)
    with pytest.raises(KeyError):
        with paca.disabled(model):
            raise KeyError("boom")
    assert torch.equal(model(ids).logits, adapted)


def test_generate_and_inputs_embeds():
    model = paca.enable(tiny_llama(), r=4)
    train(model, steps=2)
    ids = token_batch(batch=1, seq=5)
    out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 9)
    embeds = model.get_input_embeddings()(ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(ids).logits)
    assert torch.isfinite(model(ids).logits).all()


def test_hooks_are_honoured_in_auto_mode_and_warned_in_merged():
    model = tiny_llama()
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, i, o: seen.append(o.shape)
    )
    paca.enable(model, r=2)
    modes = dict((n, layer.mode) for n, layer in paca.paca_layers(model))
    assert modes["model.layers.0.self_attn.q_proj"] == "additive"
    assert modes["model.layers.0.self_attn.k_proj"] == "merged"
    model(token_batch())
    assert len(seen) == 1
    other = tiny_llama()
    other.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match="bypasses the forward hooks"):
        paca.enable(other, r=2, mode="merged")


def test_auto_mode_picks_additive_for_a_deepspeed_zero3_weight():
    model = tiny_llama()
    model.model.layers[0].mlp.up_proj.weight.ds_id = 7  # what ZeRO-3 puts on its parameters
    paca.enable(model, r=2)
    modes = dict((n, layer.mode) for n, layer in paca.paca_layers(model))
    assert modes["model.layers.0.mlp.up_proj"] == "additive"
    assert modes["model.layers.0.mlp.down_proj"] == "merged"


@pytest.mark.parametrize("reentrant", [True, False])
@pytest.mark.parametrize("mode", ["merged", "additive"])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant, mode):
    ids = token_batch()
    grads = []
    for checkpointing in (False, True):
        model = paca.enable(tiny_llama(), r=4, mode=mode)
        with torch.no_grad():
            for _, layer in paca.paca_layers(model):
                layer.delta.normal_(std=0.1)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": reentrant}
            )
            if reentrant:
                model.enable_input_require_grads()
        model(ids, labels=ids).loss.backward()
        grads.append({n: layer.delta.grad.clone() for n, layer in paca.paca_layers(model)})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-7)


def test_trainable_parameters_summary(capsys):
    model = paca.enable(tiny_llama(), r=4)
    count = paca.trainable_parameters(model)
    expected = sum(layer.delta.numel() for _, layer in paca.paca_layers(model))
    assert count.trainable == expected and count.adapted_layers == 14
    assert count.total == sum(p.numel() for p in model.parameters())
    paca.print_trainable_parameters(model)
    out = capsys.readouterr().out
    assert f"trainable params: {expected:,}" in out and "PaCA layers: 14" in out


def test_deepcopy_of_an_adapted_model_trains_on_its_own():
    model = paca.enable(tiny_llama(), r=4)
    twin = copy.deepcopy(model)
    train(twin, steps=3)
    ids = token_batch()
    # the twin's optimizer steps re-wrote the twin's columns, not the original's
    reference = tiny_llama()
    assert torch.equal(model(ids).logits, reference(ids).logits)
    adapted = twin(ids).logits.detach()
    with paca.disabled(twin):
        assert torch.equal(twin(ids).logits, reference(ids).logits)
    paca.merge(twin)
    torch.testing.assert_close(twin(ids).logits, adapted, rtol=1e-5, atol=1e-5)


def test_model_moved_with_to_keeps_adapters_consistent():
    model = paca.enable(tiny_llama(), r=2, device="cpu")
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    train(model, steps=2)
    ids = token_batch()
    expected = model(ids).logits.detach().double()
    model.to(torch.float64)
    layer = paca.paca_layers(model)[0][1]
    assert layer.delta.dtype == layer.base_cols.dtype == torch.float64
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_a_replaced_delta_parameter_still_gets_its_columns_written():
    # load_state_dict(assign=True) swaps the delta Parameter objects; a fused AdamW does not bump
    # _version, so only the optimizer hooks keep the merged columns current
    ids = token_batch()
    trained = {}
    for mode in ("merged", "additive"):
        model = paca.enable(tiny_llama(), r=4, mode=mode, seed=3)
        state = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("delta")}
        model.load_state_dict(state, strict=False, assign=True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2, fused=True)
        for _ in range(3):
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            trained[mode] = model(ids).logits
    assert not torch.allclose(trained["merged"], tiny_llama()(ids).logits, atol=1e-3)
    torch.testing.assert_close(trained["merged"], trained["additive"], rtol=1e-5, atol=1e-5)
