"""Step times of the SmolLM2 study's methods (PaCA r16, PaCA r8, LoRA r8, full fine-tuning):
the ratios its equal-time runs convert PaCA r16's budget with (scripts/smollm2_study.py,
STEP_TIMES; docs/accuracy.md, "At equal training time").

Three ways: ``paca bench``'s (fixed batches of ``--seq`` random tokens, an input that requires
grad, a per-tensor AdamW), and the study's on each of its two tasks (the task's own shuffled,
padded training batches through ``paca train``'s collator, no input gradient, the fused AdamW
the Trainer uses).

By default each method runs alone in a short process of its own, as each of the study's runs
does: every round starts one process per method in turn (the order rotates per round), each
times ``--steps`` steps every way after one untimed step. ``--shared`` instead builds every
method in this one process and steps them in turn, as ``paca bench`` does; on SmolLM2 that
slowed LoRA's steps by a third once full fine-tuning shared the process (docs/accuracy.md).
The medians and their ratios to PaCA r16 go to ``--output``.

    python scripts/study_step_times.py --rounds 3 --steps 3 \
        --output docs/results/study_step_times.json

Not in CI (real weights, minutes of CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from paca.recipes import bench, train

METHODS = {
    "PaCA r16": ("paca", 16),
    "PaCA r8": ("paca", 8),
    "LoRA r8": ("lora", 8),
    "full fine-tuning": ("full", 8),
    "frozen": ("frozen", 8),
}
# the study's two tasks, named as its run cache and paca train's --data name them
TASKS = {"loss task": "docstring-continue", "exact-match task": "docstring-module"}
WAYS = ("bench", *TASKS)


def study_batches(data: str, seq: int, batch: int, seed: int) -> list[dict]:
    """A task's training batches as ``paca train`` builds them (shuffled, padded)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(train.default_model_path("chat")))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    raw = train.BUILTIN_DATA[data][0](train.read_rows(train.DEFAULT_DATA))
    rows = train.split_rows(raw, seed)
    cfg = train.TrainConfig(task="chat", data=data, seq_len=seq)
    examples = train.chat_data(rows, tokenizer, cfg)["train"]
    loader = torch.utils.data.DataLoader(
        examples,
        batch_size=batch,
        shuffle=True,
        collate_fn=train.CausalCollator(tokenizer.pad_token_id),
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


def measure(names: list[str], args) -> dict[tuple[str, str], list[float]]:
    """Seconds per step of each method in ``names`` every way, all of them built in this
    process and stepped in turn, round by round (the order rotates per round)."""
    base_cfg = bench.BenchConfig(model="smollm2", seq=args.seq, batch=args.batch, dtype="float32")
    base = bench.build_model(base_cfg)
    device = torch.device("cpu")
    embeds, ids = bench.make_inputs(base, base_cfg, device)
    batches = {way: study_batches(data, args.seq, args.batch, 0) for way, data in TASKS.items()}
    models = {}
    for name in names:
        method, r = METHODS[name]
        cfg = dataclasses.replace(base_cfg, r=r, alpha=2 * r)
        model, single = bench.prepare(method, base, cfg, device)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = torch.optim.AdamW(params, lr=1e-5, fused=True) if params else None
        models[name] = (model, single, fused)
    times = {(way, name): [] for way in WAYS for name in names}
    for round_ in range(args.warmup + args.rounds):
        order = names[round_ % len(names) :] + names[: round_ % len(names)]
        for name in order:
            model, single, fused = models[name]
            for way in WAYS:
                if way != "bench" and fused is None:
                    continue  # frozen: nothing to train, and no input gradient this way
                start = time.perf_counter()
                if way == "bench":
                    bench.train_step(model, single, embeds, ids)
                else:
                    study_step(model, fused, batches[way][round_ % len(batches[way])])
                if round_ >= args.warmup:
                    times[(way, name)].append(time.perf_counter() - start)
    return times


def alone(args) -> dict[tuple[str, str], list[float]]:
    """Each method in a process of its own, as the study's runs are: one short process per
    method per round, the methods in turn (the order rotates per round)."""
    names = list(METHODS)
    times = {(way, name): [] for way in WAYS for name in names}
    for round_ in range(args.rounds):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            worker = [sys.executable, __file__, "--worker", name, "--seq", str(args.seq)]
            worker += ["--batch", str(args.batch), "--rounds", str(args.steps)]
            done = subprocess.run(worker, check=True, capture_output=True, text=True)
            for way, seconds in json.loads(done.stdout.splitlines()[-1]).items():
                times[(way, name)] += seconds
        print(f"round {round_ + 1}/{args.rounds}", flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds (--shared)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per process and way")
    parser.add_argument("--shared", action="store_true", help="every method in this process")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    if args.worker:  # one method alone: one untimed step per way, then --rounds timed ones
        args.warmup = 1
        times = measure([args.worker], args)
        print(json.dumps({way: seconds for (way, _), seconds in times.items() if seconds}))
        return
    times = measure(list(METHODS), args) if args.shared else alone(args)
    result = {
        "settings": vars(args) | {"model": "smollm2", "dtype": "float32"},
        "processes": (
            "every method in one process"
            if args.shared
            else "each method alone in a process of its own, a new one each round"
        ),
        "threads": torch.get_num_threads(),
    }
    for way in WAYS:
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
