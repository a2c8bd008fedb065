"""The embedded tasks: docstrings of 10 standard-library packages (``paca/recipes/data``, PSF
licence), as rows of ``text,label`` (the classification task) and, turned into questions and
answers here, the two chat tasks."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

from paca.recipes.train.files import LINE

DEFAULT_DATA = Path(__file__).parents[1] / "data" / "stdlib_docstrings.jsonl.gz"
# the chat task built from the docstring data: the question asked, the answer scored
QUESTION = "Which standard-library module is this docstring from? Answer with its name only."


def embedded_rows() -> list[dict]:
    """The docstring rows (``text``, ``label``, ``split``), read with the standard library:
    the default run needs no ``datasets`` (Docker images install paca without its
    dependencies and run it)."""
    with gzip.open(DEFAULT_DATA, "rt", encoding="utf-8") as f:
        lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]
    return [json.loads(line) | {LINE: ("line", n)} for n, line in lines]


def _carried(row: dict) -> dict:
    """What a derived row keeps of its source row: its split and where it came from."""
    return {k: v for k, v in row.items() if k not in ("text", "label")}


CONTINUE = "Continue this docstring from Python's {module} module:"


def continue_rows(rows: list[dict], longest: int = 200) -> list[dict]:
    """The second embedded task, with longer answers: a docstring's first sentence and its
    module in, the next sentences out (whole sentences, at least one, ``longest`` characters at
    most; docstrings whose second sentence is longer are left out). Scored by the loss on the
    answers, not by exact match."""
    out = []
    for r in rows:
        sentences = re.split(r"(?<=[.!?])\s+", r["text"].strip())
        if len(sentences) < 2:
            continue
        answer = sentences[1]
        if len(answer) > longest:  # whole sentences only
            continue
        for sentence in sentences[2:]:
            if len(answer) + 1 + len(sentence) > longest:
                break
            answer += " " + sentence
        prompt = f"{CONTINUE.format(module=r['label'])}\n\n{sentences[0]}"
        out.append({"prompt": prompt, "response": answer} | _carried(r))
    return out


def chat_rows(rows: list[dict]) -> list[dict]:
    """The docstring task as questions: "which module is this from?" -> the module's name."""
    return [
        {"prompt": f"{QUESTION}\n\n{r['text']}", "response": str(r["label"])} | _carried(r)
        for r in rows
    ]


# the embedded chat tasks: name -> (rows from the docstrings, scored by exact match)
BUILTIN_DATA = {"docstring-module": (chat_rows, True), "docstring-continue": (continue_rows, False)}
