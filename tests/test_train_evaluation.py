"""paca/recipes/train evaluation and loss: the teacher-forced exact match gives greedy
decoding's verdict, and logits at the labelled positions only give the full loss and
gradients."""

import pytest
import torch
from conftest import tiny_llama

import paca
from paca.recipes.train.data import CausalCollator, Examples
from paca.recipes.train.evaluation import held_out_scores
from paca.recipes.train.loss import answer_loss, scored_logits_only


def _greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


def test_teacher_forced_exact_match_is_greedy_decodings_verdict():
    model = tiny_llama(max_position_embeddings=64)
    model.generation_config.eos_token_id = None  # generate exactly the tokens asked for
    generator = torch.Generator().manual_seed(0)
    items, greedy_says = [], []
    for i in range(16):
        prompt = torch.randint(3, 96, (3 + i % 5,), generator=generator).tolist()
        answer = _greedy(model, prompt, 1 + i % 4)  # what greedy decoding answers
        if i % 2:  # one wrong token: at the start, the middle or the end
            at = (i // 2) % len(answer)
            answer[at] = (answer[at] + 1 + i) % 96
        greedy_says.append(_greedy(model, prompt, len(answer)) == answer)
        labels = [-100] * len(prompt) + answer
        items.append({"input_ids": prompt + answer, "labels": labels})
    assert 0 < sum(greedy_says) < len(items)  # both verdicts occur
    collate = CausalCollator(pad_id=0)
    alone = [held_out_scores(model, [item], collate)["exact_match"] for item in items]
    assert alone == [float(g) for g in greedy_says]
    # in padded batches of different lengths, the same verdicts
    batched = held_out_scores(model, Examples(items), collate, batch_size=5)["exact_match"]
    assert batched == pytest.approx(sum(greedy_says) / len(items))


def test_logits_at_labelled_positions_give_the_full_loss_and_gradients():
    model = paca.enable(tiny_llama(), r=4, alpha=8)
    model.train()
    collate = CausalCollator(pad_id=0)
    batch = collate(
        [
            {"input_ids": list(range(5, 17)), "labels": [-100] * 9 + list(range(14, 17))},
            {"input_ids": list(range(20, 27)), "labels": [-100] * 5 + [25, 26]},
        ]
    )
    trained = [p for p in model.parameters() if p.requires_grad]
    full = model(**batch).loss
    full_grads = torch.autograd.grad(full, trained)
    rest = {k: v for k, v in batch.items() if k != "labels"}
    with scored_logits_only(model, batch["labels"]) as selected:
        outputs = model(**rest)
    assert selected and outputs.logits.shape == (5, 96)  # 3 + 2 labelled tokens
    loss = answer_loss(outputs, batch["labels"])
    grads = torch.autograd.grad(loss, trained)
    torch.testing.assert_close(loss, full)
    for a, b in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(a, b)
    # over accumulated micro-batches the Trainer passes the labelled-token count: a sum over it
    summed = answer_loss(outputs, batch["labels"], num_items_in_batch=torch.tensor(10))
    torch.testing.assert_close(summed, full * 5 / 10)
