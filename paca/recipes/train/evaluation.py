"""Scores of a trained model on a held-out split: the loss and accuracy on the labelled tokens,
and for the chat task the exact match of its answers; each split over the processes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from paca.recipes.generate import greedy

if TYPE_CHECKING:
    from paca.recipes.train.processes import Processes


def _my_batches(n: int, batch_size: int, procs: Processes | None) -> list[range]:
    """The batches of a held-out split this process evaluates: the one-process batches, dealt
    round-robin, so every example is computed in the same batch whatever the process count
    (the numbers equal one process's; the time is 1/N)."""
    batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    rank, world = (procs.rank, procs.world) if procs is not None else (0, 1)
    return batches[rank::world]


@torch.no_grad()
def held_out_loss(
    model, dataset, collator, procs: Processes | None = None, classify=False, batch_size=64
) -> tuple[float, float | None]:
    """The held-out loss as the Trainer's ``evaluate`` defines it (each batch's mean loss,
    weighted by its examples), and the accuracy: a classifier's, or a causal LM's next-token
    accuracy on its labelled tokens (the answers: the share of answer tokens the model ranks
    first given the reference prefix); split over the processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # sum of batch losses x examples, examples, hits, the scored items (examples or tokens)
    total = torch.zeros(4, dtype=torch.float64)
    try:
        for batch in _my_batches(len(dataset), batch_size, procs):
            inputs = {k: v.to(device) for k, v in collator([dataset[i] for i in batch]).items()}
            out = model(**inputs)
            total[0] += out.loss.double().item() * len(batch)
            total[1] += len(batch)
            if classify:
                total[2] += (out.logits.argmax(-1) == inputs["labels"]).sum().item()
                total[3] += len(batch)
            elif "labels" in inputs and out.logits.dim() == 3:
                targets = inputs["labels"][:, 1:]
                scored = targets != -100
                hits = (out.logits[:, :-1].argmax(-1) == targets) & scored
                total[2] += hits.sum().item()
                total[3] += scored.sum().item()
    finally:
        model.train(was_training)
    if procs is not None:
        total = procs.sum(total)
    examples = max(total[1].item(), 1)
    accuracy = total[2].item() / total[3].item() if total[3] else None
    return total[0].item() / examples, accuracy


@torch.no_grad()
def exact_match(
    model, tokenizer, examples: list[dict], batch_size: int = 25, new_tokens=8, procs=None
):
    """Greedy answers to the examples' prompts (left-padded batches) and the share that equal
    the reference answer exactly (after stripping whitespace); split over the processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    mine: list[tuple[int, list[str]]] = []
    try:
        for batch in _my_batches(len(examples), batch_size, procs):
            chunk = [examples[i]["prompt_ids"] for i in batch]
            width = max(len(c) for c in chunk)
            ids = torch.tensor([[pad] * (width - len(c)) + c for c in chunk], device=device)
            mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in chunk])
            mine.append((batch.start, greedy(model, tokenizer, ids, mask.to(device), new_tokens)))
    finally:
        model.train(was_training)
    gathered = procs.gather(mine) if procs is not None else [mine]
    answers = [a.strip() for _, part in sorted(p for r in gathered for p in r) for a in part]
    hits = sum(a == e["answer"] for a, e in zip(answers, examples, strict=True))
    return hits / max(len(examples), 1), answers
