"""Scores of a model on a held-out split, in one forward pass per batch, split over the
processes: the loss, a classifier's accuracy or a causal LM's token accuracy on its labelled
tokens, and the exact match of the answers.

Exact match is teacher-forced: an example matches when every labelled token (each trained
answer with its end of turn) is the model's first choice given the reference tokens before
it. That is greedy decoding's verdict token for token (greedy decoding produces the answer
exactly when each of its tokens is the argmax after the ones before), read from the loss pass's
logits instead of a second, generating pass. It is reported where answers are short
(``SHORT_ANSWER`` tokens or fewer, end of turn included, for every scored example); on longer
answers the loss and token accuracy say more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from paca.recipes.generate import greedy
from paca.recipes.train.loss import scored_logits_only, targets
from paca.recipes.train.prefix import with_shared_prefix

if TYPE_CHECKING:
    from paca.recipes.train.processes import Processes

SHORT_ANSWER = 16  # tokens, end of turn included: the longest answer exact match is kept for
EVAL_BATCH = 32  # sorted by length, so smaller batches pad less


def _my_batches(lengths: list[int], batch_size: int, procs: Processes | None) -> list[list[int]]:
    """The batches of a held-out split this process evaluates: the examples in order of length
    (each batch padded to little more than its own examples; the collator pads to the longest),
    cut into one-process batches dealt round-robin, so every example is computed in the same
    batch whatever the process count (the numbers equal one process's; the time is 1/N)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    rank, world = (procs.rank, procs.world) if procs is not None else (0, 1)
    return batches[rank::world]


def short_answers(dataset) -> bool:
    """Every example's labelled tokens number at most ``SHORT_ANSWER`` (and at least one)."""
    counts = [sum(t != -100 for t in item["labels"]) for item in dataset]
    return bool(counts) and 0 < max(counts) <= SHORT_ANSWER


@torch.no_grad()
def held_out_scores(
    model,
    dataset,
    collator,
    procs: Processes | None = None,
    classify=False,
    batch_size=None,
    share_prefix=True,
) -> dict[str, float | None]:
    """Scores of ``model`` on ``dataset`` (items the ``collator`` batches into ``input_ids``
    ``(batch, tokens)`` and ``labels``: ``(batch,)`` for a classifier, ``(batch, tokens)`` with
    ``-100`` where unscored for a causal LM). A causal LM's batch runs its shared prompt prefix
    once (``prefix.with_shared_prefix``) unless ``share_prefix`` is off.

    Returns:
        dict: ``loss`` (as the Trainer's ``evaluate`` defines it: each batch's mean loss over
        its labelled tokens, weighted by its examples), ``accuracy`` (a classifier's, or the
        share of labelled tokens ranked first given the reference prefix) and ``exact_match``
        (causal LMs: the share of examples whose every labelled token is ranked first; ``None``
        for a classifier).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # sum of batch losses x examples, examples, hits, scored items, examples all hit
    total = torch.zeros(5, dtype=torch.float64)
    try:
        lengths = [len(dataset[i]["input_ids"]) for i in range(len(dataset))]
        for batch in _my_batches(lengths, batch_size or EVAL_BATCH, procs):
            inputs = {k: v.to(device) for k, v in collator([dataset[i] for i in batch]).items()}
            labels = inputs["labels"]
            total[1] += len(batch)
            if classify or labels.dim() != 2:
                out = model(**inputs)
                total[0] += out.loss.double().item() * len(batch)
                if classify:
                    total[2] += (out.logits.argmax(-1) == labels).sum().item()
                    total[3] += len(batch)
                continue
            if share_prefix:
                inputs = with_shared_prefix(model, inputs)  # the same logits, less work
                labels = inputs["labels"]
            rest = {k: v for k, v in inputs.items() if k != "labels"}
            with scored_logits_only(model, labels) as selected:
                logits = model(**rest).logits
            if not selected:  # full logits: keep the scored positions
                logits = logits[:, :-1][labels[:, 1:] != -100]
            goal = targets(labels)  # (n,)
            loss = torch.nn.functional.cross_entropy(logits.float(), goal)
            total[0] += loss.double().item() * len(batch)
            hit = logits.argmax(-1) == goal  # (n,)
            rows = (labels[:, 1:] != -100).nonzero()[:, 0]  # the example of each scored token
            misses = torch.zeros(len(batch), device=device).index_add_(0, rows, (~hit).float())
            has_answer = torch.zeros(len(batch), device=device).index_add_(
                0, rows, torch.ones_like(rows, dtype=torch.float)
            )
            total[2] += hit.sum().item()
            total[3] += goal.numel()
            total[4] += ((misses == 0) & (has_answer > 0)).sum().item()
    finally:
        model.train(was_training)
    if procs is not None:
        total = procs.sum(total)
    examples = max(total[1].item(), 1)
    accuracy = total[2].item() / total[3].item() if total[3] else None
    exact = None if classify or not total[3] else total[4].item() / examples
    return {"loss": total[0].item() / examples, "accuracy": accuracy, "exact_match": exact}


def held_out_loss(
    model, dataset, collator, procs: Processes | None = None, classify=False, batch_size=64
) -> tuple[float, float | None]:
    """``(loss, accuracy)`` of ``held_out_scores``."""
    scores = held_out_scores(model, dataset, collator, procs, classify, batch_size)
    return scores["loss"], scores["accuracy"]


@torch.no_grad()
def greedy_answers(model, tokenizer, examples: list[dict], new_tokens: int = 16) -> list[str]:
    """Greedy answers to the examples' prompts (``input_ids`` up to ``answer_start``), decoded
    without special tokens and stripped: what a run prints beside a few references."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    try:
        chunk = [e["input_ids"][: e["answer_start"]] for e in examples]
        if not chunk:
            return []
        width = max(len(c) for c in chunk)
        ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
        answers = greedy(model, tokenizer, ids, mask.to(device), new_tokens)
    finally:
        model.train(was_training)
    return [a.strip() for a in answers]
