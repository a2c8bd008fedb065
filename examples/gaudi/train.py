"""Fine-tune a causal LM with PaCA on Intel Gaudi (see README.md in this folder for commands).

    PT_HPU_LAZY_MODE=0 python train.py --model meta-llama/Llama-3.1-8B --data train.jsonl

``--trainer plain`` (default): transformers' Trainer on hpu, eager mode (Intel's default
path). ``--trainer gaudi``: Optimum-Habana's GaudiTrainer (``--lazy`` for lazy mode). Both
write adapter-only checkpoints. ``--cpu`` turns any of these commands into a CPU dry run (the
same trainer, Optimum-Habana's own loop included, in fp32 and eager); ``--tiny`` swaps the
model and data for a tiny LLaMA built from a config and random tokens (no download).
"""

import argparse
import json
import sys

import torch
import transformers

from paca.integrations import gaudi
from paca.recipes.loading import dtype_argument


class TextFile(torch.utils.data.Dataset):
    """A JSONL file of {"text": ...} lines, tokenized to a fixed length (static shapes)."""

    def __init__(self, path, tokenizer, seq_len):
        with open(path, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f if line.strip()]
        self.ids = tokenizer(
            texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt"
        )["input_ids"]
        self.pad = tokenizer.pad_token_id

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        ids = self.ids[i]
        return {"input_ids": ids, "labels": ids.masked_fill(ids == self.pad, -100)}


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, n, seq_len, vocab):
        self.ids = torch.randint(0, vocab, (n, seq_len), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="hub id or local folder (not with --tiny)")
    p.add_argument("--data", help="JSONL with a text field (not with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny LLaMA from a config, random data")
    p.add_argument("--cpu", action="store_true", help="a CPU dry run of the same command")
    p.add_argument("--trainer", choices=["plain", "gaudi"], default="plain")
    p.add_argument("--lazy", action="store_true", help="GaudiTrainer in lazy mode (legacy)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--output", default="paca-gaudi-out")
    args = p.parse_args()
    if args.cpu and args.lazy:
        print("--cpu: lazy mode exists only on a Gaudi; the dry run is eager", file=sys.stderr)

    common = dict(
        output_dir=args.output,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, args.max_steps // 20),
        logging_steps=10,
        save_steps=max(1, args.max_steps // 4),
        bf16=not args.cpu,
        dataloader_drop_last=True,  # one batch shape: one graph
        report_to=[],
    )
    if args.cpu:
        common["use_cpu"] = True
    if args.trainer == "plain":
        training_args = transformers.TrainingArguments(**common)
    else:
        # before the model, as Optimum-Habana's own scripts do: on a Gaudi, building these
        # arguments runs adapt_transformers_to_gaudi, which must precede building the model (its
        # modeling classes, and the GenerationConfig whose fields GaudiTrainer reads); with
        # --cpu they select the CPU and GaudiTrainer runs as a dry run
        _, _, gaudi_arguments = gaudi.optimum_habana()
        training_args = gaudi_arguments(
            use_habana=not args.cpu, use_lazy_mode=args.lazy and not args.cpu, **common
        )

    if args.tiny:
        config = transformers.LlamaConfig(
            vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2,
        )  # fmt: skip
        model, tokenizer = transformers.LlamaForCausalLM(config), None
        data = RandomTokens(64, min(args.seq_len, 32), config.vocab_size)
    else:
        if not (args.model and args.data):
            p.error("give --model and --data (or --tiny)")
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model, **dtype_argument(torch.bfloat16)
        )
        data = TextFile(args.data, tokenizer, args.seq_len)

    # adapt where the model is (the Trainer moves it to hpu); touches no device itself
    model = gaudi.enable(model, r=args.r, alpha=args.alpha)
    if args.trainer == "plain":
        trainer = gaudi.hpu_trainer(model, training_args, train_dataset=data)
    else:
        trainer = gaudi.gaudi_trainer(model, training_args, train_dataset=data)
    trainer.train()
    trainer.save_model(f"{args.output}/adapter")
    if tokenizer is not None:
        tokenizer.save_pretrained(f"{args.output}/adapter")
    print(f"wrote {args.output}/adapter")


if __name__ == "__main__":
    main()
