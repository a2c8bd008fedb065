"""One state object on the model, gone after unload/merge; sync_weights for optimizers that
bypass torch.optim's step hooks."""

import torch
from conftest import tiny_llama, token_batch

import paca
from paca.state import ATTRIBUTE, PacaState


def _paca_attributes(model):
    return sorted(k for k in vars(model) if "paca" in k.lower())


def test_one_state_object_and_nothing_left_after_unload_or_merge():
    calibration = [{"input_ids": token_batch(seed=1)}]
    for finish in (paca.unload, paca.merge):
        model = tiny_llama()
        before = _paca_attributes(model)
        paca.enable(model, r=4, selection="activation", calibration=calibration)
        paca.add_adapter(model, "second", r=2)
        assert _paca_attributes(model) == sorted([*before, ATTRIBUTE])
        state = paca.get_state(model)
        assert isinstance(state, PacaState)
        assert list(state.configs) == ["default", "second"] and state.active == "default"
        assert state.config is paca.get_config(model)
        assert state.calibration["strategy"] == "activation"
        paca.set_adapter(model, "second")
        assert paca.active_adapter(model) == "second" and paca.get_config(model).r == 2
        finish(model)
        assert _paca_attributes(model) == before, finish.__name__
        assert paca.get_state(model) is None and paca.adapter_names(model) == []


def test_state_is_not_part_of_the_state_dict_and_survives_deepcopy():
    import copy

    model = paca.enable(tiny_llama(), r=4)
    assert not any("paca_state" in k for k in model.state_dict())
    clone = copy.deepcopy(model)
    assert paca.get_state(clone) is not paca.get_state(model)
    assert paca.get_state(clone).configs == paca.get_state(model).configs


def test_sync_weights_after_an_update_that_bypasses_torch_optim():
    ids = token_batch()
    model = paca.enable(tiny_llama().double(), r=4, mode="merged")
    reference = paca.enable(tiny_llama().double(), r=4, mode="additive")
    # an optimizer of its own (DeepSpeed's, say) writing p.data: no torch.optim step hook runs
    # and p.data does not bump the parameter's version, so the columns in the weights go stale
    with torch.no_grad():
        for (_, a), (_, b) in zip(
            paca.paca_layers(model), paca.paca_layers(reference), strict=True
        ):
            step = torch.randn_like(a.delta)
            a.delta.data.add_(step)
            b.delta.data.add_(step)
    expected = reference(ids).logits
    assert not torch.allclose(model(ids).logits, expected, atol=1e-9), "columns were stale"
    assert paca.sync_weights(model) is model
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-10, atol=1e-10)


def test_bad_input_to_the_state_accessors():
    import pytest

    plain = tiny_llama()
    assert paca.get_state(plain) is None and paca.active_adapter(plain) is None
    with pytest.raises(ValueError, match="has no PaCA adapters to read; call paca.enable first"):
        paca.get_config(plain)
    with pytest.warns(UserWarning, match="has no PaCA adapters; nothing to sync"):
        assert paca.sync_weights(plain) is plain
    model = paca.enable(tiny_llama(), r=4)
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; it has \['default'\]"):
        paca.get_config(model, "nope")
