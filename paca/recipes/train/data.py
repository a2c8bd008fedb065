"""The data of a run: rows read from the user's file (or the embedded one), split into
train/validation/test, and turned into token ids with loss labels for each task."""

from __future__ import annotations

import csv
import gzip
import json
import random
from pathlib import Path

import torch

from paca.recipes.generate import prompt_ids
from paca.recipes.train.config import TrainError

LINE = "_paca_line"  # where a row came from in the user's file, for error messages


def read_rows(path: Path) -> list[dict]:
    """Rows of a JSONL (optionally gzipped) or CSV file, with line numbers in errors."""
    if not path.is_file():
        raise TrainError(f"data={path}: no such file")
    name = path.name.lower()
    rows: list[dict] = []
    if name.endswith(".csv"):
        with path.open(newline="", encoding="utf-8") as f:
            rows = [row | {LINE: number} for number, row in enumerate(csv.DictReader(f), start=2)]
    elif name.endswith((".jsonl", ".jsonl.gz", ".json")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise TrainError(
                        f"data={path} line {number}: not valid JSON ({exc.msg})"
                    ) from None
                if not isinstance(row, dict):
                    raise TrainError(f"data={path} line {number}: expected a JSON object")
                rows.append(row | {LINE: number})
    else:
        raise TrainError(f"data={path}: use a .jsonl or .csv file")
    if not rows:
        raise TrainError(f"data={path}: the dataset is empty")
    return rows


def split_rows(rows: list[dict], seed: int) -> dict[str, list[dict]]:
    """The file's own ``split`` column, else a fixed 90/10 train/validation split."""
    if all("split" in row for row in rows):
        splits = {s: [r for r in rows if r["split"] == s] for s in ("train", "validation", "test")}
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


def require_fields(rows: list[dict], fields: tuple[str, ...], path: str) -> None:
    for row in rows:
        missing = [f for f in fields if row.get(f) in (None, "")]
        if missing:
            raise TrainError(f"data={path} line {row[LINE]}: no {', '.join(missing)} field")


class Examples(torch.utils.data.Dataset):
    def __init__(self, items: list[dict]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def classification_data(rows, tokenizer, cfg, labels):
    label2id = {label: i for i, label in enumerate(labels)}
    out = {}
    for split, items in rows.items():
        encoded = (
            tokenizer([r["text"] for r in items], truncation=True, max_length=cfg.seq_len)
            if items
            else None
        )
        out[split] = Examples(
            [
                {
                    "input_ids": encoded["input_ids"][i],
                    "attention_mask": encoded["attention_mask"][i],
                    "labels": label2id[str(r["label"])],
                }
                for i, r in enumerate(items)
            ]
        )
    return out


def causal_lm_data(rows, tokenizer, cfg):
    out = {}
    for split, items in rows.items():
        examples = []
        for r in items:
            if "prompt" in r and "response" in r:
                prompt = tokenizer(str(r["prompt"]), add_special_tokens=True)["input_ids"]
                response = tokenizer(str(r["response"]), add_special_tokens=False)["input_ids"]
                ids = (prompt + response + [tokenizer.eos_token_id])[: cfg.seq_len]
                labels = ([-100] * len(prompt) + response + [tokenizer.eos_token_id])[: cfg.seq_len]
            else:
                ids = tokenizer(str(r["text"]), truncation=True, max_length=cfg.seq_len)[
                    "input_ids"
                ]
                labels = list(ids)
            examples.append({"input_ids": ids, "labels": labels})
        out[split] = Examples(examples)
    return out


def chat_data(rows, tokenizer, cfg):
    """Prompt (a user turn of the chat template) + answer + end of turn; the loss is on the
    answer only. A prompt too long for ``seq_len`` loses the end of its text, never the
    template's turn markers."""
    overhead = len(prompt_ids(tokenizer, "")[0])
    out = {}
    for split, items in rows.items():
        examples = []
        for r in items:
            answer = str(r["response"])
            response = tokenizer(answer, add_special_tokens=False)["input_ids"]
            response = response + [tokenizer.eos_token_id]
            budget = max(cfg.seq_len - overhead - len(response), 1)
            text = tokenizer(str(r["prompt"]), add_special_tokens=False)["input_ids"][:budget]
            prompt = prompt_ids(tokenizer, tokenizer.decode(text))[0].tolist()
            examples.append(
                {
                    "input_ids": prompt + response,
                    "labels": [-100] * len(prompt) + response,
                    "prompt_ids": prompt,
                    "answer": answer,
                }
            )
        out[split] = Examples(examples)
    return out


class CausalCollator:
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
            "labels": pad([b["labels"] for b in batch], -100),
        }
