"""Accuracy study: PaCA against LoRA, full fine-tuning and head-only training on the default
task of ``paca train`` (all-MiniLM-L6-v2, standard-library docstrings), same step budget.

1. Learning-rate sweep on the validation split (seed 0) for each configuration, extended
   by a factor of 2 when the best rate lies at an edge of the sweep.
2. The best rate of each configuration, on seeds 0, 1, 2; test accuracy mean and spread.

Every finished run is cached in OUT/runs.json, so an interrupted study resumes where it
stopped. Writes docs/accuracy.md and docs/results/accuracy.json.

    python scripts/accuracy_study.py [--steps 200] [--out /tmp/paca-accuracy]
"""

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from paca.recipes.train import TrainConfig, run

# (name, method, r, alpha, learning rates to sweep[, PaCA column selection])
CONFIGS = [
    ("PaCA r16 (= LoRA r8 params)", "paca", 16, 32, [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]),
    ("PaCA r8", "paca", 8, 16, [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]),
    ("LoRA r8", "lora", 8, 16, [5e-4, 1e-3, 2e-3, 4e-3, 8e-3]),
    ("full fine-tuning", "full", 8, 16, [2.5e-5, 5e-5, 1e-4, 2e-4]),
    ("head only", "head", 8, 16, [5e-3, 1e-2, 2e-2, 4e-2, 8e-2]),
    # selection strategies (paca.selection), PaCA r8 as above; rates around its best
    ("PaCA r8, weight-norm columns", "paca", 8, 16, [4e-3, 8e-3], "weight-norm"),
    ("PaCA r8, activation columns", "paca", 8, 16, [4e-3, 8e-3], "activation"),
    ("PaCA r8, gradient columns", "paca", 8, 16, [4e-3, 8e-3], "gradient"),
]
SEEDS = [0, 1, 2]
DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = DOCS / "results"  # raw results; the documents stay in docs/


def saved_bytes(method: str, r: int, alpha: float) -> int:
    """Bytes saved for backward by one training step of batch 16 (params and buffers excluded)."""
    import itertools

    import transformers

    from paca.recipes.train import (
        DEFAULT_DATA,
        apply_method,
        classification_data,
        default_model_path,
        read_rows,
        split_rows,
    )

    cfg = TrainConfig(task="classification", method=method, r=r, alpha=alpha)
    path = str(default_model_path())
    rows = split_rows(read_rows(DEFAULT_DATA), 0)
    labels = sorted({r["label"] for r in rows["train"]})
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=len(labels)
    )
    model = apply_method(model, cfg, torch.device("cpu")).train()
    data = classification_data({"train": rows["train"][:16]}, tokenizer, cfg, labels)["train"]
    batch = transformers.DataCollatorWithPadding(tokenizer)([data[i] for i in range(16)])
    owned = {
        t.untyped_storage().data_ptr() for t in itertools.chain(model.parameters(), model.buffers())
    }
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in owned:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch).loss
    loss.backward()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--out", default="/tmp/paca-accuracy")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache_file = out / "runs.json"
    runs = json.loads(cache_file.read_text()) if cache_file.exists() else {}

    def train_one(method, r, alpha, lr, seed, selection="random"):
        key = f"{method}-r{r}-a{alpha}-lr{lr}-s{seed}-steps{args.steps}"
        key += "" if selection == "random" else f"-{selection}"
        if key not in runs:
            folder = out / key
            shutil.rmtree(folder, ignore_errors=True)
            started = time.time()
            cfg = TrainConfig(
                task="classification",
                method=method,
                r=r,
                alpha=alpha,
                lr=lr,
                seed=seed,
                max_steps=args.steps,
                output=str(folder),
                selection=selection,
            )
            metrics = run(cfg)
            metrics["wall_seconds"] = time.time() - started
            runs[key] = metrics
            cache_file.write_text(json.dumps(runs, indent=1))
            shutil.rmtree(folder, ignore_errors=True)
            val = metrics["after"]["validation"]["accuracy"]
            test = metrics["after"]["test"]["accuracy"]
            print(f"{key}: val {val:.4f} test {test:.4f}", file=sys.stderr, flush=True)
        return runs[key]

    table = []
    for name, method, r, alpha, rates, *rest in CONFIGS:
        selection = rest[0] if rest else "random"

        def train(method, r, alpha, lr, seed, _selection=selection):
            return train_one(method, r, alpha, lr, seed, _selection)

        sweep = {
            lr: train(method, r, alpha, lr, 0)["after"]["validation"]["accuracy"] for lr in rates
        }
        best = max(sweep, key=sweep.get)
        # a best rate at the edge of the sweep: extend it that way (twice at most)
        for _ in range(2):
            if len(sweep) < 2 or best not in (min(sweep), max(sweep)):
                break
            lr = best * 2 if best == max(sweep) else best / 2
            sweep[lr] = train(method, r, alpha, lr, 0)["after"]["validation"]["accuracy"]
            if sweep[lr] <= sweep[best]:
                break
            best = lr
        finals = [train(method, r, alpha, best, seed) for seed in SEEDS]
        tests = [100 * m["after"]["test"]["accuracy"] for m in finals]
        table.append(
            {
                "name": name,
                "method": method,
                "r": r,
                "alpha": alpha,
                "sweep_validation_accuracy": {str(k): v for k, v in sweep.items()},
                "lr": best,
                "test_accuracy": tests,
                "mean": statistics.mean(tests),
                "std": statistics.stdev(tests),
                "trainable_params": finals[0]["trainable_params"],
                "seconds_per_step": statistics.median(
                    m["train"]["seconds_per_step"] for m in finals
                ),
                "saved_bytes": saved_bytes(method, r, alpha),
                "selection": selection,
                "calibration_seconds": statistics.median(
                    (m.get("calibration") or {}).get("seconds", 0.0) for m in finals
                ),
            }
        )
    report = {
        "steps": args.steps,
        "batch_size": 16,
        "seq_len": 64,
        "seeds": SEEDS,
        "configs": table,
        "torch": torch.__version__,
    }
    (RESULTS / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        "| configuration | lr (best on validation) | test accuracy % (mean ± std, 3 seeds) "
        "| seeds | trainable params | s/step | saved for backward MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table:
        lines.append(
            f"| {row['name']} | {row['lr']:g} | {row['mean']:.1f} ± {row['std']:.1f} | "
            f"{', '.join(f'{t:.1f}' for t in row['test_accuracy'])} | "
            f"{row['trainable_params']:,} | "
            f"{row['seconds_per_step']:.2f} | {row['saved_bytes'] / 2**20:.1f} |"
        )
    sweep_lines = ["| configuration | validation accuracy by lr (seed 0) |", "|---|---|"]
    for row in table:
        sweep_lines.append(
            f"| {row['name']} | "
            + ", ".join(
                f"{lr}: {100 * acc:.1f}%" for lr, acc in row["sweep_validation_accuracy"].items()
            )
            + " |"
        )
    (out / "table.md").write_text("\n".join(lines) + "\n\n" + "\n".join(sweep_lines) + "\n")
    print("\n".join(lines))
    print("\n".join(sweep_lines))


if __name__ == "__main__":
    main()
