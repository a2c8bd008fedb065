"""Several named adapters on one model: add, switch, delete, save and load each."""

import pytest
import torch
from conftest import tiny_bert_classifier, tiny_llama, token_batch, train_lm
from torch import nn

import paca
from paca.layer import PacaLinear


def train(model, steps=3, lr=1e-2, seed=0):
    torch.manual_seed(seed)
    train_lm(model, token_batch(seed=seed + 3), steps, lr)
    return [p for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("mode", ["merged", "additive"])
def test_add_switch_and_train_each_adapter(mode):
    ids = token_batch()
    model = tiny_llama()
    base = model(ids).logits.detach()
    paca.enable(model, r=4, mode=mode, adapter_name="a")
    train(model, seed=1)
    out_a = model(ids).logits.detach()
    paca.add_adapter(model, "b", r=2, seed=5, mode=mode)
    assert paca.adapter_names(model) == ["a", "b"]
    assert paca.active_adapter(model) == "a"
    assert torch.equal(model(ids).logits, out_a), "adding an adapter does not change the active one"
    paca.set_adapter(model, "b")
    assert paca.get_config(model).r == 2
    assert torch.equal(model(ids).logits, base), "a fresh adapter starts at the base model"
    trained = train(model, seed=2)
    layers = [layer for _, layer in paca.paca_layers(model)]
    # only the active adapter trains
    assert {id(p) for p in trained} == {id(layer.adapters["b"].delta) for layer in layers}
    assert all(layer.adapters["a"].delta.grad is None for layer in layers)
    out_b = model(ids).logits.detach()
    assert not torch.allclose(out_b, base)
    paca.set_adapter(model, "a")
    assert torch.equal(model(ids).logits, out_a)
    paca.set_adapter(model, "b")
    assert torch.equal(model(ids).logits, out_b)
    with paca.disabled(model):
        assert torch.equal(model(ids).logits, base)
    assert torch.equal(model(ids).logits, out_b)
    paca.unload(model)
    assert torch.equal(model(ids).logits, base)


def test_each_adapter_saves_and_loads_on_its_own(tmp_path):
    ids = token_batch()
    model = paca.enable(tiny_llama(), r=4, adapter_name="a")
    train(model, seed=1)
    paca.add_adapter(model, "b", r=4, target_modules=["q_proj", "v_proj"], seed=3)
    paca.set_adapter(model, "b")
    train(model, seed=2)
    outputs = {}
    for name in ("a", "b"):
        paca.set_adapter(model, name)
        outputs[name] = model(ids).logits.detach()
        paca.save_adapter(model, tmp_path / name)
    # one fresh model, both adapters loaded by name
    fresh = paca.load_adapter(tiny_llama(), tmp_path / "a", adapter_name="a")
    paca.load_adapter(fresh, tmp_path / "b", adapter_name="b")
    assert paca.active_adapter(fresh) == "a", "a loaded adapter is added, not activated"
    assert torch.equal(fresh(ids).logits, outputs["a"])
    paca.set_adapter(fresh, "b")
    assert torch.equal(fresh(ids).logits, outputs["b"])
    # saving a non-active adapter by name
    paca.save_adapter(fresh, tmp_path / "a2", adapter_name="a")
    again = paca.load_adapter(tiny_llama(), tmp_path / "a2")
    assert torch.equal(again(ids).logits, outputs["a"])


def test_adapter_on_fewer_layers_leaves_the_others_at_base():
    ids = token_batch()
    model = paca.enable(tiny_llama(), r=4, target_modules=["q_proj"], adapter_name="q")
    paca.add_adapter(model, "mlp", r=4, target_modules=["up_proj"])
    layers = dict(paca.paca_layers(model))
    assert set(layers["model.layers.0.mlp.up_proj"].adapters) == {"mlp"}
    assert layers["model.layers.0.mlp.up_proj"].active_adapter is None  # "q" is active
    paca.set_adapter(model, "mlp")
    assert layers["model.layers.0.self_attn.q_proj"].active_adapter is None
    train(model)
    with torch.no_grad():
        q_layer = layers["model.layers.0.self_attn.q_proj"]
        assert torch.equal(q_layer.weight, q_layer.base_layer.weight)
    paca.delete_adapter(model, "q")
    # the q_proj layers carried only "q": they are plain layers again
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert paca.adapter_names(model) == ["mlp"]
    assert model(ids).logits.isfinite().all()


def test_delete_rules():
    model = paca.enable(tiny_llama(), r=2, adapter_name="a")
    paca.add_adapter(model, "b", r=2)
    with pytest.raises(ValueError, match="no adapter named 'c'; it has \\['a', 'b'\\]"):
        paca.delete_adapter(model, "c")
    with pytest.warns(UserWarning, match="deleting the active adapter 'a'; 'b' is active now"):
        paca.delete_adapter(model, "a")
    assert paca.active_adapter(model) == "b"
    with pytest.raises(ValueError, match="only adapter; use paca.unload"):
        paca.delete_adapter(model, "b")
    with pytest.raises(ValueError, match="already has an adapter named 'b'"):
        paca.add_adapter(model, "b")
    with pytest.raises(ValueError, match="without dots"):
        paca.add_adapter(model, "x.y")
    with pytest.raises(ValueError, match="call paca.enable first"):
        paca.add_adapter(tiny_llama(), "b")


def test_merge_folds_the_active_adapter_and_names_the_dropped_ones():
    ids = token_batch()
    model = paca.enable(tiny_llama(), r=4, adapter_name="a")
    paca.add_adapter(model, "b", r=4, seed=1)
    paca.set_adapter(model, "b")
    train(model)
    expected = model(ids).logits.detach()
    with pytest.warns(UserWarning, match=r"folds the active adapter 'b' and drops \['a'\]"):
        paca.merge(model)
    assert not any(isinstance(m, PacaLinear) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_each_adapter_has_its_own_classification_head(tmp_path):
    ids, labels = token_batch(), torch.tensor([0, 1])
    model = paca.enable(tiny_bert_classifier(), r=4, adapter_name="task1")
    paca.add_adapter(model, "task2", r=4)
    assert set(model.classifier.copies) == {"task1", "task2"}
    paca.set_adapter(model, "task2")
    assert model.classifier.trained.weight.requires_grad
    assert not model.classifier.copies["task1"].weight.requires_grad
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert not torch.equal(
        model.classifier.copies["task2"].weight, model.classifier.original.weight
    )
    assert torch.equal(model.classifier.copies["task1"].weight, model.classifier.original.weight)
    out2 = model(ids).logits.detach()
    paca.save_adapter(model, tmp_path / "t2")
    fresh = paca.load_adapter(tiny_bert_classifier(), tmp_path / "t2")
    assert torch.equal(fresh(ids).logits, out2)
