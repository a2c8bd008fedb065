"""A conversation through the model's chat template: token ids and assistant-only labels.

The assistant's tokens are found in the template's own rendering, not by a pattern: for each
trained turn ``i`` the template renders the conversation up to ``i`` with the generation prompt
(``P``) and up to and including ``i`` (``Q``); the turn is ``Q[len(P):]`` without its trailing
whitespace, which is the answer and the template's end of turn (``json<|im_end|>`` in ChatML).
The rendering is tokenized piece by piece at those boundaries, so no token straddles an
answer's edge and the prompt before an answer is tokenized as generation would see it. A
template that renders an earlier turn differently once later turns follow (some drop reasoning
from past turns) is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IGNORE = -100  # the label of a token the loss skips


class TemplateError(ValueError):
    """A conversation the template cannot render as trainable turns (the caller adds where)."""


@dataclass
class Rendered:
    """One example: ``input_ids`` and ``labels`` (``IGNORE`` outside the trained turns), the
    token where the last trained turn starts, and what had to be cut to fit."""

    input_ids: list[int]
    labels: list[int]
    answer_start: int
    cut: list[str] = field(default_factory=list)  # "early turns", "last user turn", "answer"


def _apply(tokenizer, messages: list[dict], generation: bool) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation
        )
    except Exception as exc:  # jinja raises its own errors, templates raise_exception(...)
        raise TemplateError(f"the chat template refuses this conversation ({exc})") from None


def _spans(tokenizer, messages: list[dict], trained: list[int]) -> tuple[str, list[tuple]]:
    """The rendering up to the last trained turn and each trained turn's ``(start, end)``
    characters in it."""
    full = _apply(tokenizer, messages[: trained[-1] + 1], False)
    spans = []
    for i in trained:
        before = _apply(tokenizer, messages[:i], True)
        upto = _apply(tokenizer, messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise TemplateError(
                f"the chat template renders turn {i + 1} differently once later turns follow, "
                "so its tokens cannot be found; train on rows that end at that turn"
            )
        end = len(upto.rstrip())
        if end <= len(before):
            raise TemplateError(f"the chat template renders assistant turn {i + 1} as nothing")
        spans.append((len(before), end))
    return full[: spans[-1][1]], spans


def _tokens(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _encode(tokenizer, messages, trained) -> tuple[list[int], list[int], int]:
    """``(ids, labels, start of the last trained turn)`` through the chat template."""
    text, spans = _spans(tokenizer, messages, trained)
    ids: list[int] = []
    labels: list[int] = []
    at = answer_start = 0
    for start, end in spans:
        prompt = _tokens(tokenizer, text[at:start])
        answer = _tokens(tokenizer, text[start:end])
        ids += prompt
        labels += [IGNORE] * len(prompt)
        answer_start = len(ids)
        ids += answer
        labels += answer
        at = end
    return ids, labels, answer_start


def _encode_plain(tokenizer, messages, trained) -> tuple[list[int], list[int], int]:
    """Without a chat template (a base model's tokenizer): one user turn as plain text with the
    tokenizer's own special tokens, then the answer and the end-of-text token."""
    prompt = tokenizer(messages[0]["content"])["input_ids"]
    answer = _tokens(tokenizer, messages[1]["content"]) + [tokenizer.eos_token_id]
    return prompt + answer, [IGNORE] * len(prompt) + answer, len(prompt)


def _exchanges(messages: list[dict]) -> list[int]:
    """Indices where an exchange starts: each user turn after the leading system turns."""
    return [i for i, m in enumerate(messages) if m["role"] == "user"]


def render(tokenizer, messages: list[dict], trained: list[int], seq_len: int) -> Rendered:
    """``messages`` as ids and labels of at most ``seq_len`` tokens, the loss on ``trained``.

    Too long a conversation first loses whole exchanges from its start (a system turn stays),
    as long as another trained turn is left; then the end of the last user turn's text; only
    then the end of its last answer.

    Args:
        tokenizer: a Hugging Face tokenizer; without a chat template only a single user turn
            and answer can be rendered (as plain text).
        messages (list[dict]): ``{"role", "content"}`` in order.
        trained (list[int]): indices of the assistant turns the loss is on (ascending).
        seq_len (int): the most tokens an example keeps.

    Raises:
        TemplateError: the template refuses the conversation, renders turns inconsistently,
            or is missing where the conversation needs one.
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    if not templated and [m["role"] for m in messages] != ["user", "assistant"]:
        raise TemplateError(
            "the tokenizer has no chat template, so only a single user turn and answer can be "
            "rendered; use a chat model or set tokenizer.chat_template"
        )
    encode = _encode if templated else _encode_plain
    messages = [dict(m) for m in messages]
    ids, labels, start = encode(tokenizer, messages, trained)
    cut: list[str] = []
    # whole exchanges first, while a trained turn remains after the dropped one
    while len(ids) > seq_len:
        starts = _exchanges(messages)
        if len(starts) < 2 or trained[-1] < starts[1]:
            break  # the last trained turn is in the first exchange
        drop = range(starts[0], starts[1])
        messages = messages[: starts[0]] + messages[starts[1] :]
        trained = [t - len(drop) for t in trained if t >= starts[1]]
        ids, labels, start = encode(tokenizer, messages, trained)
        if "early turns" not in cut:
            cut.append("early turns")
    # then the end of the last user turn's text (a few passes: the template's tokens around a
    # shorter text need not add up exactly)
    users = [i for i in _exchanges(messages) if i < trained[-1]]
    if len(ids) > seq_len and users:
        last = users[-1]
        text = _tokens(tokenizer, messages[last]["content"])
        keep = len(text)
        while len(ids) > seq_len and keep > 1:
            keep = max(keep - (len(ids) - seq_len), 1)
            messages[last]["content"] = tokenizer.decode(text[:keep])
            ids, labels, start = encode(tokenizer, messages, trained)
        cut.append("last user turn")
    if len(ids) > seq_len:  # the answer alone does not fit
        ids, labels = ids[:seq_len], labels[:seq_len]
        cut.append("answer")
    return Rendered(ids, labels, start, cut)
