"""Step times of PaCA r16 and LoRA r8 two ways, interleaved in one process, to find which
step-time ratio the SmolLM2 study's equal-time runs should use (docs/accuracy.md, "At equal
training time"): ``paca bench``'s way (fixed batches of ``--seq`` random tokens, an input that
requires grad, a per-tensor AdamW) and the study's way (the loss task's own padded batches
through ``paca train``'s collator, no input gradient, the fused AdamW the Trainer uses).

Each round times one step of every method in both ways (the order rotates per round); the
medians after ``--warmup`` untimed rounds and their ratios to PaCA r16 go to ``--output``.

    python scripts/study_step_times.py --rounds 9 --output docs/results/study_step_times.json

Not in CI (real weights, minutes of CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from paca.recipes import bench, train

METHODS = {"PaCA r16": ("paca", 16), "LoRA r8": ("lora", 8), "frozen": ("frozen", 8)}


def study_batches(seq: int, batch: int, seed: int) -> list[dict]:
    """The loss task's training batches as ``paca train`` builds them (shuffled, padded)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(train.default_model_path("chat")))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    raw = train.continue_rows(train.read_rows(train.DEFAULT_DATA))
    rows = train.split_rows(raw, seed)
    cfg = train.TrainConfig(task="chat", data="docstring-continue", seq_len=seq)
    examples = train.chat_data(rows, tokenizer, cfg)["train"]
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=batch,
        shuffle=True,
        collate_fn=train._CausalCollator(tokenizer.pad_token_id),
        generator=torch.Generator().manual_seed(seed),
    )
    keep = ("input_ids", "attention_mask", "labels")
    return [{k: b[k] for k in keep} for b in loader]


def study_step(model, optimizer, batch: dict) -> None:
    loss = model(**batch).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    base_cfg = bench.BenchConfig(model="smollm2", seq=args.seq, batch=args.batch, dtype="float32")
    base = bench.build_model(base_cfg)
    device = torch.device("cpu")
    embeds, ids = bench.make_inputs(base, base_cfg, device)
    batches = study_batches(args.seq, args.batch, seed=0)
    models = {}
    for name, (method, r) in METHODS.items():
        cfg = dataclasses.replace(base_cfg, r=r, alpha=2 * r)
        model, single = bench.prepare(method, base, cfg, device)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None
        models[name] = (model, single, fused)
    times = {(way, name): [] for way in ("bench", "study") for name in METHODS}
    names = list(METHODS)
    for round_ in range(args.warmup + args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        batch = batches[round_ % len(batches)]
        for name in order:
            model, single, fused = models[name]
            for way in ("bench", "study"):
                if way == "study" and fused is None:
                    continue  # frozen: nothing to train, and no input gradient this way
                start = time.perf_counter()
                if way == "bench":
                    bench.train_step(model, single, embeds, ids)
                else:
                    study_step(model, fused, batch)
                if round_ >= args.warmup:
                    times[(way, name)].append(time.perf_counter() - start)
        print(f"round {round_ + 1}/{args.warmup + args.rounds}", flush=True)
    result = {
        "settings": vars(args) | {"model": "smollm2", "dtype": "float32"},
        "study_tokens_per_batch": statistics.mean(b["input_ids"].numel() for b in batches),
        "bench_tokens_per_batch": args.batch * args.seq,
        "threads": torch.get_num_threads(),
    }
    for way in ("bench", "study"):
        timed = [name for name in METHODS if times[(way, name)]]
        medians = {name: statistics.median(times[(way, name)]) for name in timed}
        result[way] = {
            name: {
                "median_s": medians[name],
                "x_paca_r16": medians[name] / medians["PaCA r16"],
                "seconds": times[(way, name)],
            }
            | ({"x_frozen": medians[name] / medians["frozen"]} if "frozen" in medians else {})
            for name in timed
        }
        line = ", ".join(
            f"{n} {medians[n]:.2f} s ({medians[n] / medians['PaCA r16']:.3f}x PaCA r16)"
            for n in timed
        )
        print(f"{way}: {line}")
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
