"""paca/recipes/train/prefix.py: a batch's shared prompt prefix run once gives the per-row
computation's loss, gradients and held-out scores (float64 model, so any difference beyond
rounding shows; LLaMA's RMSNorm rounds to fp32)."""

import pytest
import torch
from conftest import tiny_llama

import paca
from paca.recipes.train.data import CausalCollator, Examples
from paca.recipes.train.evaluation import held_out_scores
from paca.recipes.train.loss import answer_loss, scored_logits_only
from paca.recipes.train.prefix import MIN_PREFIX, shared_length, with_shared_prefix

PREFIX = list(range(40, 40 + MIN_PREFIX + 4))  # a system turn and a question, say


def _items(prefix=PREFIX):
    """Chat-like examples: the shared prefix, a prompt of its own, a labelled answer; of
    different lengths, so the batch is right-padded."""
    generator = torch.Generator().manual_seed(1)
    items = []
    for i in range(6):
        prompt = prefix + torch.randint(3, 90, (2 + i,), generator=generator).tolist()
        answer = torch.randint(3, 90, (1 + i % 3,), generator=generator).tolist()
        items.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    return items


def _loss_and_grads(model, batch, share: bool):
    if share:
        batch = with_shared_prefix(model, batch)
        assert batch["input_ids"].shape[1] == max(len(i["input_ids"]) for i in _items()) - len(
            PREFIX
        )
    rest = {k: v for k, v in batch.items() if k != "labels"}
    with scored_logits_only(model, batch["labels"]):
        loss = answer_loss(model(**rest), batch["labels"])
    trained = [p for p in model.parameters() if p.requires_grad]
    return loss, torch.autograd.grad(loss, trained)


@pytest.mark.parametrize("method", ["paca", "full"])
def test_shared_prefix_gives_the_same_loss_and_gradients(method):
    model = tiny_llama(dtype=torch.float64)
    if method == "paca":
        model = paca.enable(model, r=4, alpha=8)
    model.train()
    batch = CausalCollator(pad_id=0)(_items())
    loss, grads = _loss_and_grads(model, dict(batch), share=False)
    shared_loss, shared_grads = _loss_and_grads(model, dict(batch), share=True)
    torch.testing.assert_close(shared_loss, loss, rtol=1e-10, atol=1e-12)
    assert len(grads) > 0
    for got, expected in zip(shared_grads, grads, strict=True):
        # LLaMA's RMSNorm computes in fp32 even in a float64 model, and the prefix's gradient
        # reaches it summed over the rows (per row, without the sharing): fp32 rounding apart
        scale = expected.abs().max()
        assert scale > 0 and (got - expected).abs().max() <= 1e-6 * scale


def test_held_out_scores_are_the_same_with_and_without_the_shared_prefix():
    model = paca.enable(tiny_llama(dtype=torch.float64), r=4, alpha=8)
    items = Examples(_items() * 2)
    collate = CausalCollator(pad_id=0)
    plain = held_out_scores(model, items, collate, batch_size=4, share_prefix=False)
    shared = held_out_scores(model, items, collate, batch_size=4, share_prefix=True)
    assert shared == pytest.approx(plain, rel=1e-10)


def test_the_shared_length_stops_at_a_difference_a_pad_or_a_scored_position():
    ids = torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 9, 5]])
    assert shared_length(ids, None, None) == 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    assert shared_length(ids, mask, None) == 2
    labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, -100, 3, 9, 5]])
    assert shared_length(ids, None, labels) == 1  # position 1 predicts a labelled token
    same = torch.tensor([[1, 2, 3], [1, 2, 3]])
    assert shared_length(same, None, None) == 2  # one position left to each row


def test_inputs_pass_through_where_nothing_is_shared():
    model = tiny_llama()
    short = CausalCollator(pad_id=0)(_items(prefix=[7] * (MIN_PREFIX - 1)))
    assert with_shared_prefix(model, short) is short
    one_row = CausalCollator(pad_id=0)(_items()[:1])
    assert with_shared_prefix(model, one_row) is one_row
