"""The data of a run: rows (``files.read_rows``) split into train/validation/test, checked
against their format (``formats``), and turned into token ids with loss labels for each task.

Every dataset is an ``Examples``; its ``cut`` counts the examples ``seq_len`` shortened, by what
they lost (``"early turns"``, ``"last user turn"``, ``"answer"``, ``"text"``), which the run
says at its start.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import torch

from paca.recipes.train.errors import TrainError
from paca.recipes.train.files import LINE, SPLITS, read_rows, where
from paca.recipes.train.formats import conversation, detect, text_pair
from paca.recipes.train.templates import IGNORE, TemplateError, render

__all__ = ["LINE", "read_rows"]  # re-exported: the rows' line key and the reader live in files


def split_rows(
    rows: list[dict] | dict[str, list[dict]], seed: int, path: Path | str = ""
) -> dict[str, list[dict]]:
    """Train/validation/test rows: a ``DatasetDict``'s own splits, else the file's ``split``
    column (every row's), else a fixed 90/10 train/validation split.

    Raises:
        TrainError: a ``split`` value that is not train, validation or test, a row without one
            where others have one, or no training rows.
    """
    if isinstance(rows, dict):
        splits = {s: list(rows.get(s, [])) for s in SPLITS}
    elif any(row.get("split") is not None for row in rows):
        for row in rows:
            if row.get("split") not in SPLITS:
                raise TrainError(
                    f"{where(row, path)}: split {row.get('split')!r} is not one of "
                    f"{', '.join(SPLITS)}; give every row one of them, or drop the split column"
                )
        splits = {s: [r for r in rows if r["split"] == s] for s in SPLITS}
    else:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        n_val = max(1, len(rows) // 10) if len(rows) > 1 else 0
        splits = {
            "train": [rows[i] for i in order[n_val:]],
            "validation": [rows[i] for i in order[:n_val]],
            "test": [],
        }
    if not splits["train"]:
        raise TrainError("the dataset has no training examples")
    return splits


class Examples(torch.utils.data.Dataset):
    """Tokenized examples (dicts); ``cut``: how many ``seq_len`` shortened, by what;
    ``answers``: whether the labelled tokens are answers (chat, prompt/response) rather than
    whole texts, so that exact match can mean something."""

    def __init__(self, items: list[dict], cut: Counter | None = None, answers: bool = False):
        self.items = items
        self.cut = cut if cut is not None else Counter()
        self.answers = answers

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _format(rows: dict[str, list[dict]], path, task: str, name: str | None):
    every = [r for items in rows.values() for r in items]
    return detect(every, path, task, name)


def classification_data(rows, tokenizer, cfg, labels, path=""):
    """``text,label`` rows as ``input_ids``, ``attention_mask`` and the label's index."""
    _format(rows, path, "classification", "text-label")
    label2id = {label: i for i, label in enumerate(labels)}

    def encode(row):
        ids = tokenizer(str(row["text"]))["input_ids"]
        lost = "text" if len(ids) > cfg.seq_len else None
        encoded = tokenizer(str(row["text"]), truncation=True, max_length=cfg.seq_len)
        item = {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "labels": label2id[str(row["label"])],
        }
        return item, lost

    return _examples(rows, encode, answers=False)


def _examples(rows: dict[str, list[dict]], encode, answers: bool) -> dict[str, Examples]:
    """``Examples`` of each split; ``encode(row)`` gives ``(item, what seq_len cut or None)``."""
    out = {}
    for split, items in rows.items():
        examples, cut = [], Counter()
        for row in items:
            item, lost = encode(row)
            examples.append(item)
            if lost:
                cut[lost] += 1
        out[split] = Examples(examples, cut, answers)
    return out


def causal_lm_data(rows, tokenizer, cfg, path="", format=None):
    """``text`` rows (the loss on every token), or a prompt and its answer as plain text (the
    loss on the answer and the end-of-text token)."""
    fmt = _format(rows, path, "causal-lm", format)

    def encode(row):
        text, answer = text_pair(row, fmt, path)
        if answer is None:
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            labels = list(ids)
        else:
            prompt = tokenizer(text, add_special_tokens=True)["input_ids"]
            response = tokenizer(answer, add_special_tokens=False)["input_ids"]
            ids = prompt + response + [tokenizer.eos_token_id]
            labels = [IGNORE] * len(prompt) + response + [tokenizer.eos_token_id]
        lost = ("text" if answer is None else "answer") if len(ids) > cfg.seq_len else None
        return {"input_ids": ids[: cfg.seq_len], "labels": labels[: cfg.seq_len]}, lost

    return _examples(rows, encode, answers=fmt.name != "text")


def chat_data(rows, tokenizer, cfg, path="", format=None):
    """Conversations through the model's chat template (``templates.render``), the loss on the
    trained assistant turns. Each item also keeps ``answer_start`` (where the last trained turn
    starts), ``question`` (the last user turn before it) and ``answer`` (that turn's text).

    Raises:
        TrainError: a row the format or the chat template refuses, naming its line.
    """
    fmt = _format(rows, path, "chat", format)

    def encode(row):
        messages, trained = conversation(row, fmt, path)
        try:
            rendered = render(tokenizer, messages, trained, cfg.seq_len)
        except TemplateError as exc:
            raise TrainError(f"{where(row, path)}: {exc}") from None
        last = trained[-1]
        users = [m["content"] for m in messages[:last] if m["role"] == "user"]
        item = {
            "input_ids": rendered.input_ids,
            "labels": rendered.labels,
            "answer_start": rendered.answer_start,
            "question": users[-1] if users else "",
            "answer": messages[last]["content"],
        }
        return item, (rendered.cut[-1] if rendered.cut else None)  # the most it lost

    return _examples(rows, encode, answers=True)


class CausalCollator:
    """Right-pads ``input_ids`` (with ``pad_id``) and ``labels`` (with ``-100``) to the longest
    example: ``input_ids``, ``attention_mask`` and ``labels``, each ``(batch, tokens)``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: list[dict]) -> dict:
        width = max(len(b["input_ids"]) for b in batch)

        def pad(values, fill):
            return torch.tensor([v + [fill] * (width - len(v)) for v in values])

        ids = pad([b["input_ids"] for b in batch], self.pad_id)
        mask = pad([[1] * len(b["input_ids"]) for b in batch], 0)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": pad([b["labels"] for b in batch], IGNORE),
        }
