"""Models whose weights accelerate offloads (weights on meta, loaded per call by its hooks):
additive mode on the execution device, the offloaded weights never written."""

import copy

import pytest
import torch
from conftest import tiny_bert_classifier, tiny_llama, token_batch, train_lm

import paca

accelerate = pytest.importorskip("accelerate")


def _offloaded(how, tmp_path, base):
    model = copy.deepcopy(base)
    if how == "cpu_offload":
        return accelerate.cpu_offload(model, execution_device="cpu")
    if how == "disk_offload":
        return accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    # dispatch_model with a device map: embeddings and the first block on the CPU, the rest on
    # disk, as device_map="auto" with offload lays out a model too big for the device
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "disk",
    }
    return accelerate.dispatch_model(
        model, device_map=device_map, offload_dir=str(tmp_path / "offload"), main_device="cpu"
    )


def _stored_weights(model):
    """What accelerate loads into each offloaded layer: its weights map, read directly."""
    out = {}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        weights = getattr(hook, "weights_map", None)
        if weights is not None:
            prefix = getattr(weights, "prefix", "")
            for key in list(weights.keys()):
                local = key[len(prefix) :] if key.startswith(prefix) else key
                out[key] = weights[local].detach().clone()
    return out


HOW = ["cpu_offload", "disk_offload", "dispatch_model"]


@pytest.mark.parametrize("how", HOW)
def test_offloaded_model_trains_in_additive_mode_and_the_base_stays(tmp_path, how):
    base = tiny_llama()
    ids = token_batch()
    with torch.no_grad():
        want = base(ids).logits
    model = _offloaded(how, tmp_path, base)
    stored = _stored_weights(model)
    assert stored and any(p.is_meta for p in model.parameters())
    paca.enable(model, r=4)
    layers = paca.paca_layers(model)
    assert len(layers) == 14
    offloaded = [n for n, layer in layers if layer.base_layer.weight.is_meta]
    assert offloaded, "some adapted layers live behind accelerate's hooks"
    assert all(layer.mode == "additive" for n, layer in layers if n in offloaded)
    assert all(layer.delta.device.type == "cpu" for _, layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)  # identity at init
    losses = train_lm(model, ids, 4)
    assert losses[-1] < losses[0]
    after = _stored_weights(model)
    assert after.keys() == stored.keys()
    assert all(torch.equal(after[k], stored[k]) for k in stored), "offloaded weights changed"
    with torch.no_grad():
        trained = model(ids).logits
    paca.save_adapter(model, tmp_path / "adapter")
    # onto a fresh offloaded base: the trained model again
    fresh = paca.load_adapter(_offloaded(how, tmp_path / "fresh", base), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained, rtol=1e-6, atol=1e-6)
    # and onto the plain base model
    plain = paca.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, trained, rtol=1e-5, atol=1e-5)
    paca.unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=0)


def test_merge_of_an_offloaded_model_is_refused_with_the_fix(tmp_path):
    model = paca.enable(_offloaded("disk_offload", tmp_path, tiny_llama()), r=4)
    with pytest.raises(ValueError, match="offloaded by accelerate.*paca.save_adapter"):
        paca.merge(model)
    assert len(paca.paca_layers(model)) == 14, "the model is unchanged"


def test_merged_mode_and_moving_are_refused_for_offloaded_layers(tmp_path):
    model = _offloaded("cpu_offload", tmp_path, tiny_llama())
    with pytest.raises(ValueError, match="mode='merged' cannot adapt .*offloaded"):
        paca.enable(model, r=4, mode="merged")
    # a stand-in for a model that runs on an accelerator: its hooks say so (never run)
    for module in model.modules():
        if hasattr(module, "_hf_hook"):
            module._hf_hook.execution_device = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="offloaded by accelerate.*onto .*cuda:0.*device='auto'"):
        paca.enable(model, r=4, device="cpu")  # a real move: off the accelerator
    assert not paca.paca_layers(model) and paca.get_state(model) is None


@pytest.mark.parametrize("how", HOW)
def test_the_device_an_offloaded_model_runs_on_is_accepted(tmp_path, how):
    base = tiny_llama()
    ids = token_batch()
    model = paca.enable(_offloaded(how, tmp_path, base), r=4, device="cpu")
    layers = paca.paca_layers(model)
    assert len(layers) == 14 and all(layer.mode == "additive" for _, layer in layers
                                     if layer.base_layer.weight.is_meta)  # fmt: skip
    assert torch.equal(model(ids).logits, base(ids).logits)


def test_an_offloaded_module_cannot_be_trained_in_full(tmp_path):
    model = accelerate.cpu_offload(tiny_bert_classifier(), execution_device="cpu")
    with pytest.raises(ValueError, match="classifier.*offloaded"):
        paca.enable(model, r=4)
    assert not paca.paca_layers(model)
