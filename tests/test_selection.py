"""Column selection strategies: what each picks, calibration side effects, saved indices."""

import pytest
import torch
from conftest import tiny_bert_classifier, tiny_llama, token_batch

import paca
from paca.selection import STRATEGIES, column_scores, select_columns

LAYER = "model.layers.0.mlp.down_proj"


def _calibration(n=2):
    return [
        {"input_ids": token_batch(seed=s), "labels": token_batch(seed=s)} for s in range(1, n + 1)
    ]


def _idx(model, name=LAYER):
    return model.get_submodule(name).active.idx


def test_every_strategy_gives_r_sorted_distinct_indices():
    for strategy in STRATEGIES:
        calibration = _calibration() if strategy in ("activation", "gradient") else None
        model = paca.enable(tiny_llama(), r=5, selection=strategy, calibration=calibration)
        for _, layer in paca.paca_layers(model):
            idx = layer.active.idx
            assert idx.shape == (5,) and idx.dtype == torch.int64
            assert torch.equal(idx, idx.unique().sort().values), strategy


def test_weight_norm_picks_the_largest_columns():
    model = tiny_llama()
    weight = model.get_submodule(LAYER).weight
    with torch.no_grad():
        weight[:, [3, 40, 41]] *= 50  # down_proj has 64 inputs
    paca.enable(model, r=3, selection="weight-norm")
    assert _idx(model).tolist() == [3, 40, 41]


def test_activation_picks_the_outlier_channels():
    model = tiny_llama()
    up = model.get_submodule("model.layers.0.mlp.up_proj")
    with torch.no_grad():  # channels 7 and 9 of the down projection's input become outliers
        up.weight[[7, 9]] *= 100
    paca.enable(model, r=2, selection="activation", calibration=_calibration())
    assert _idx(model).tolist() == [7, 9]


def test_gradient_scores_equal_the_dense_weight_gradient_column_norms():
    calibration = _calibration(2)
    model = tiny_llama().double()
    names = [LAYER, "model.layers.1.self_attn.q_proj"]
    scores, report = column_scores(model, names, "gradient", calibration)
    assert report["batches"] == 2 and report["seconds"] >= 0
    # reference: dense weight gradients, batch by batch, squared column norms summed
    reference = {
        n: torch.zeros(model.get_submodule(n).in_features, dtype=torch.float64) for n in names
    }
    for batch in calibration:
        model.zero_grad()
        for n in names:
            model.get_submodule(n).weight.requires_grad_(True)
        model(**batch).loss.backward()
        for n in names:
            reference[n] += model.get_submodule(n).weight.grad.square().sum(0)
    for n in names:
        torch.testing.assert_close(scores[n].double(), reference[n].sqrt(), rtol=1e-4, atol=1e-8)


def test_calibration_changes_no_weight_leaves_no_grad_and_restores_the_mode():
    model = tiny_llama().train()
    for p in model.parameters():
        p.requires_grad_(True)  # as a freshly loaded model: everything trainable
    state = {k: v.clone() for k, v in model.state_dict().items()}
    names = [LAYER, "model.layers.0.self_attn.v_proj"]
    for strategy in ("activation", "gradient"):
        column_scores(model, names, strategy, _calibration())
        assert model.training
        assert all(p.grad is None and p.requires_grad for p in model.parameters())
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k]), k


def test_selected_columns_are_saved_and_load_without_calibration(tmp_path):
    model = paca.enable(tiny_llama(), r=4, selection="gradient", calibration=_calibration())
    assert paca.get_state(model).calibration["strategy"] == "gradient"
    paca.save_adapter(model, tmp_path)
    fresh = paca.load_adapter(tiny_llama(), tmp_path)  # no calibration needed
    pairs = zip(paca.paca_layers(model), paca.paca_layers(fresh), strict=True)
    for (name, layer), (_, loaded) in pairs:
        assert torch.equal(layer.active.idx, loaded.active.idx), name


def test_gradient_selection_works_on_a_bert_classifier():
    model = tiny_bert_classifier()
    ids = token_batch()
    calibration = [{"input_ids": ids, "labels": torch.tensor([0, 2])}]
    paca.enable(model, r=4, selection="gradient", calibration=calibration)
    assert len(paca.paca_layers(model)) > 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(selection="activation"), "needs calibration batches"),
        (dict(selection="random", calibration=[{}]), "used by selection='activation'"),
        (dict(selection="gradient", calibration=[]), "needs calibration batches"),
        (
            dict(selection="gradient", calibration=[{"input_ids": token_batch()}]),
            "output has no loss",
        ),
        (dict(selection="activation", calibration=[[1, 2]]), "dicts of tensors or tensors"),
    ],
)
def test_calibration_errors_leave_the_model_unchanged(kwargs, message):
    model = tiny_llama()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=message):
        paca.enable(model, r=4, **kwargs)
    assert not paca.paca_layers(model) and paca.get_state(model) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_select_columns_needs_scores_for_a_scored_strategy():
    with pytest.raises(ValueError, match="no column scores"):
        select_columns(8, 2, strategy="weight-norm", name="x")
    assert select_columns(8, 2, strategy="activation", scores=torch.arange(8.0)).tolist() == [6, 7]


@pytest.fixture
def last_columns():
    from paca import selection

    @selection.scorer("last-columns")
    def _last(model, names, calibration):
        """the r columns with the highest index (a test strategy)."""
        return {n: torch.arange(model.get_submodule(n).in_features).float() for n in names}

    yield selection
    del selection.STRATEGIES["last-columns"]


def test_a_new_strategy_is_one_function_and_one_registration(last_columns):
    assert "last-columns: the r columns with the highest index" in (
        last_columns.describe_strategies()
    )
    model = paca.enable(tiny_llama(), r=3, selection="last-columns")
    assert _idx(model).tolist() == [61, 62, 63]  # down_proj has 64 inputs
    assert paca.get_state(model).calibration["strategy"] == "last-columns"
    with pytest.raises(ValueError, match="selection='none-such' is unknown; choose one of random"):
        paca.enable(tiny_llama(), selection="none-such")


def test_calibration_from_a_generator_is_counted_once():
    batches = (b for b in _calibration(3))  # can be iterated only once
    model = paca.enable(tiny_llama(), r=2, selection="activation", calibration=batches)
    assert paca.get_state(model).calibration["batches"] == 3
