"""The row formats ``paca train`` reads, detected from the rows or named (``format=``).

Chat (``task="chat"``; through the model's chat template, loss on the assistant's tokens):

- ``messages``: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
  (OpenAI, TRL's conversational language modeling): every assistant turn is trained;
- ``sharegpt``: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}, ...]}``,
  read as ``messages`` (``human`` is the user, ``gpt`` the assistant; no other ``from``);
- ``prompt-completion`` (TRL): ``{"prompt": "...", "completion": "..."}``, or each a list of
  messages (conversational); only the completion is trained;
- ``prompt-response`` (paca's own): ``{"prompt": "...", "response": "..."}``;
- ``alpaca``: ``{"instruction": "...", "input": "...", "output": "..."}``; a non-empty input
  goes after the instruction, separated by a blank line.

Continued pretraining (``task="causal-lm"``, loss on every token): ``text`` (``{"text": ...}``);
``prompt-response`` and plain-string ``prompt-completion`` rows are read there as the prompt
followed by the answer, the loss on the answer. Classification: ``text-label``.
"""

from __future__ import annotations

from dataclasses import dataclass

from paca.recipes.train.errors import TrainError
from paca.recipes.train.files import where

ROLES = ("system", "user", "assistant")
# ShareGPT's speakers -> roles; any other "from" is refused rather than guessed
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant"}  # fmt: skip


@dataclass(frozen=True)
class Format:
    """A row format: the fields every row has, those it may have, the tasks that read it."""

    name: str
    fields: tuple[str, ...]
    tasks: tuple[str, ...]
    optional: tuple[str, ...] = ()
    example: str = ""


# detection order: the first whose fields a row has (non-empty) names its format
FORMATS = {
    f.name: f
    for f in (
        Format(
            "messages",
            ("messages",),
            ("chat",),
            example='{"messages": [{"role": "user", "content": "Hi"}, '
            '{"role": "assistant", "content": "Hello!"}]}',
        ),
        Format(
            "sharegpt",
            ("conversations",),
            ("chat",),
            example='{"conversations": [{"from": "human", "value": "Hi"}, '
            '{"from": "gpt", "value": "Hello!"}]}',
        ),
        Format(
            "alpaca",
            ("instruction", "output"),
            ("chat",),
            optional=("input",),
            example='{"instruction": "Translate to French", "input": "cat", "output": "chat"}',
        ),
        Format(
            "prompt-completion",
            ("prompt", "completion"),
            ("chat", "causal-lm"),
            example='{"prompt": "2+2=", "completion": "4"}',
        ),
        Format(
            "prompt-response",
            ("prompt", "response"),
            ("chat", "causal-lm"),
            example='{"prompt": "2+2=", "response": "4"}',
        ),
        Format(
            "text-label",
            ("text", "label"),
            ("classification",),
            example='{"text": "great film", "label": "positive"}',
        ),  # fmt: skip
        Format("text", ("text",), ("causal-lm",), example='{"text": "Once upon a time"}'),
    )
}


def _has(row: dict, field: str) -> bool:
    # datasets fills a field missing from a row with None (the file's columns are the union)
    return row.get(field) is not None


def row_format(row: dict) -> Format | None:
    """The first format whose fields ``row`` has; ``None`` if none."""
    return next((f for f in FORMATS.values() if all(_has(row, k) for k in f.fields)), None)


def _known() -> str:
    return "; ".join(f"{f.name} {{{', '.join(f.fields)}}}" for f in FORMATS.values())


def detect(rows: list[dict], path, task: str, name: str | None = None) -> Format:
    """The one format of ``rows``: ``name`` if given, else the first row's.

    Raises:
        TrainError: an unknown ``name``; a row without a format's fields; rows of two formats;
            a format the task does not read.
    """
    if name is not None and name not in FORMATS:
        raise TrainError(f"format={name!r} is unknown; choose one of {', '.join(FORMATS)}")
    fmt = FORMATS[name] if name else None
    for row in rows:
        found = row_format(row)
        if fmt is None:
            if found is None:
                fields = ", ".join(k for k in row if not k.startswith("_")) or "none"
                raise TrainError(
                    f"{where(row, path)}: no known format (fields: {fields}); known formats: "
                    f"{_known()}"
                )
            fmt = found
        if name is None and found is not None and found != fmt:
            raise TrainError(
                f"{where(row, path)}: rows of mixed formats: this row is {found.name} "
                f"({', '.join(found.fields)}), the rows before it {fmt.name} "
                f"({', '.join(fmt.fields)}); use one format per file"
            )
        missing = [k for k in fmt.fields if not _has(row, k)]
        if missing:
            other = f" (the row is {found.name})" if found is not None and found != fmt else ""
            raise TrainError(
                f"{where(row, path)}: no {', '.join(missing)} field{other}; {fmt.name} rows "
                f"look like {fmt.example}"
            )
    if fmt is not None and task not in fmt.tasks:
        tasks = " or ".join(fmt.tasks)
        raise TrainError(f"data={path}: {fmt.name} rows train with task={tasks}, not {task!r}")
    return fmt


def _messages(row: dict, value, field: str, path, roles=None) -> list[dict]:
    """``value`` checked as a list of ``{"role", "content"}`` (or ShareGPT's ``from``/``value``,
    with ``roles``) and returned as plain messages."""
    if not isinstance(value, list) or not value:
        raise TrainError(f"{where(row, path)}: {field} must be a non-empty list of messages")
    role_key, text_key = ("from", "value") if roles else ("role", "content")
    out = []
    for turn, message in enumerate(value, start=1):
        if not isinstance(message, dict) or message.get(role_key) is None:
            raise TrainError(
                f"{where(row, path)}: {field} message {turn} has no {role_key!r}; each message "
                f'is {{"{role_key}": ..., "{text_key}": ...}}'
            )
        role = message[role_key]
        if roles is not None:
            if role not in roles:
                raise TrainError(
                    f"{where(row, path)}: {field} message {turn}: 'from' {role!r} is unknown; "
                    f"use {', '.join(roles)} (or convert the row to messages)"
                )
            role = roles[role]
        elif role not in ROLES:
            raise TrainError(
                f"{where(row, path)}: {field} message {turn}: role {role!r} is unknown; use "
                f"{', '.join(ROLES)}"
            )
        content = message.get(text_key)
        if not isinstance(content, str):
            raise TrainError(
                f"{where(row, path)}: {field} message {turn} ({role}): {text_key!r} must be a "
                f"string, not {type(content).__name__}"
            )
        out.append({"role": role, "content": content})
    return out


def conversation(row: dict, fmt: Format, path) -> tuple[list[dict], list[int]]:
    """A chat row as ``(messages, trained)``: the messages in order and the indices of those
    the loss is on (assistant turns).

    Raises:
        TrainError: a malformed message list, an unknown role, no assistant turn to train on,
            or an empty one.
    """
    if fmt.name in ("messages", "sharegpt"):
        field = fmt.fields[0]
        roles = SHAREGPT_ROLES if fmt.name == "sharegpt" else None
        messages = _messages(row, row[field], field, path, roles)
        trained = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    elif fmt.name == "alpaca":
        prompt = str(row["instruction"])
        if row.get("input") not in (None, ""):
            prompt = f"{prompt}\n\n{row['input']}"
        messages = [{"role": "user", "content": prompt}, _answer(row, "output")]
        trained = [1]
    else:  # prompt-completion, prompt-response
        answer_field = fmt.fields[1]
        # a CSV or Parquet column of numbers is read as numbers: text all the same
        prompt, answer = (_text(row["prompt"]), _text(row[answer_field]))
        if isinstance(prompt, str) != isinstance(answer, str):
            raise TrainError(
                f"{where(row, path)}: prompt and {answer_field} must both be strings or both be "
                "lists of messages"
            )
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}, _answer(row, answer_field)]
            trained = [1]
        else:
            before = _messages(row, prompt, "prompt", path)
            after = _messages(row, answer, answer_field, path)
            messages = before + after
            trained = [len(before) + i for i, m in enumerate(after) if m["role"] == "assistant"]
    if not trained:
        raise TrainError(
            f"{where(row, path)}: no assistant turn, so nothing to train on; add the answer as "
            '{"role": "assistant", "content": ...}'
        )
    for i in trained:
        if not messages[i]["content"].strip():
            raise TrainError(
                f"{where(row, path)}: message {i + 1} (assistant) is empty; give it the answer "
                "or drop the row"
            )
    return messages, trained


def _text(value):
    return value if isinstance(value, (list, str)) else str(value)


def _answer(row: dict, field: str) -> dict:
    return {"role": "assistant", "content": str(row[field])}


def text_pair(row: dict, fmt: Format, path) -> tuple[str, str | None]:
    """A causal-lm row as ``(text, None)`` or ``(prompt, answer)``.

    Raises:
        TrainError: conversational prompt/completion rows (they belong to ``task="chat"``).
    """
    if fmt.name == "text":
        return str(row["text"]), None
    prompt, answer = _text(row["prompt"]), _text(row[fmt.fields[1]])
    if not isinstance(prompt, str) or not isinstance(answer, str):
        raise TrainError(
            f"{where(row, path)}: conversational {fmt.name} rows train with task='chat'"
        )
    return prompt, answer
