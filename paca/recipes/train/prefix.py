"""A batch's shared prompt prefix computed once instead of once per example.

Chat examples start with the same tokens: the template's system turn (SmolLM2 adds its own,
about 20 tokens, when the conversation has none) and, in the default task, the question before
each docstring: about 37 of an example's 79 tokens on average. Those positions' hidden states,
keys and values are the same in every row of the batch (causal attention: a position sees only
the ones before it), so the decoder runs them once, on one row, and the batch continues from
their key/value cache, repeated per row. Same logits and loss; the gradients flow back through
the repeated cache into the one prefix computation, which sums them over the rows, as the
per-row computation would. What it saves is the prefix's share of the forward and backward.

It stays off where it cannot apply or was not tried: no ``input_ids``, one row, a prefix
shorter than ``MIN_PREFIX``, a model without ``get_decoder`` or a cache that repeats per row,
and a scored position inside the prefix (the prefix's logits are never computed).
"""

from __future__ import annotations

import inspect

import torch

from paca.recipes.train.loss import scored

MIN_PREFIX = 8  # tokens: a shorter shared prefix is not worth a second forward call
CACHE = "past_key_values"


def shared_length(input_ids: torch.Tensor, attention_mask, labels) -> int:
    """How many leading positions every row shares (same token, attended), none of them scored
    (position ``t`` is scored when it predicts a labelled token), leaving at least one position
    to each row."""
    rows, width = input_ids.shape
    same = (input_ids == input_ids[:1]).all(0)
    if attention_mask is not None:
        same &= attention_mask.bool().all(0)
    if labels is not None:
        same &= ~scored(labels).any(0)
    differs = (~same).nonzero()
    length = int(differs[0, 0]) if len(differs) else width
    return min(length, width - 1)


def with_shared_prefix(model, inputs: dict) -> dict:
    """``inputs`` for ``model``'s forward with their shared prefix computed once: the
    ``input_ids`` and ``labels`` after it, the whole ``attention_mask`` and the prefix's
    key/value cache as ``past_key_values`` (``cache`` in transformers 5.25). ``inputs`` as
    they are where it does not apply. Gradients of the prefix's computation are kept (this is
    a training forward too)."""
    ids = inputs.get("input_ids")
    if ids is None or ids.dim() != 2 or ids.shape[0] < 2 or {CACHE, "cache"} & set(inputs):
        return inputs
    decoder = getattr(model, "get_decoder", lambda: None)()
    if decoder is None:
        return inputs
    mask, labels = inputs.get("attention_mask"), inputs.get("labels")
    length = shared_length(ids, mask, labels)
    if length < MIN_PREFIX:
        return inputs
    # transformers 5.25 calls the cache argument and output "cache", earlier ones
    # "past_key_values"
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else CACHE
    cache = getattr(decoder(input_ids=ids[:1, :length], use_cache=True), name, None)
    if cache is None or not hasattr(cache, "batch_repeat_interleave"):
        return inputs
    cache.batch_repeat_interleave(ids.shape[0])
    shared = dict(inputs, input_ids=ids[:, length:], **{name: cache})
    if labels is not None:
        shared["labels"] = labels[:, length:]
    return shared
