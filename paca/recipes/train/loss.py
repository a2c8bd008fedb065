"""The causal LM's loss computed from the logits of the labelled positions only.

A chat example of the default task is about 96 tokens, of which 2 to 6 are the answer; the
model's output layer still computes 49,152 logits at every position (SmolLM2's vocabulary),
and the loss keeps the few it labels. Selecting the labelled positions' hidden states before
the output layer gives the same loss and gradients (the other positions' logits never reach
the loss) and skips most of the output layer's GEMMs and the softmax over a ``(tokens, vocab)``
block: on the default task that block was 4.7 GB of the held-out pass's resident memory (batch
64, fp32) and about a fifth of a training step's arithmetic (docs/benchmarks.md, "The default
paca train run").
"""

from __future__ import annotations

import contextlib

import torch

from paca.recipes.train.templates import IGNORE


def scored(labels: torch.Tensor) -> torch.Tensor:
    """``(batch, tokens)`` bool: the positions whose logits predict a labelled next token
    (position ``t`` predicts token ``t + 1``; the last position predicts nothing)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def targets(labels: torch.Tensor) -> torch.Tensor:
    """``(n,)``: the labelled tokens, in the order of ``scored``'s positions (row-major)."""
    shifted = labels[:, 1:]
    return shifted[shifted != IGNORE]


@contextlib.contextmanager
def scored_logits_only(model, labels: torch.Tensor):
    """While inside, ``model``'s forward returns logits of shape ``(n, vocab)``: only the
    positions ``scored(labels)`` selects, in row-major order. Does nothing (full
    ``(batch, tokens, vocab)`` logits) for a model without output embeddings."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield False
        return
    mask = scored(labels)

    def select(module, args):
        hidden = args[0]  # (batch, tokens, hidden)
        return (hidden[mask.to(hidden.device)], *args[1:])  # (n, hidden)

    handle = head.register_forward_pre_hook(select)
    try:
        yield True
    finally:
        handle.remove()


def answer_loss(outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """Cross-entropy of ``outputs.logits`` ``(n, vocab)`` (from ``scored_logits_only``) against
    the labelled tokens: summed over ``num_items_in_batch`` when given (the Trainer's count of
    labelled tokens over the accumulated micro-batches), else the mean; the loss transformers'
    causal LMs compute from full logits."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
    goal = targets(labels).to(logits.device)
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits.float(), goal)
    total = torch.nn.functional.cross_entropy(logits.float(), goal, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch
