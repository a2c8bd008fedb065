"""`paca train` in one process against two (torchrun, gloo) on this machine: the same global
batch, steps per second and the evaluation's time (loss and greedy generation, split over the
processes). Writes docs/results/train_processes.json and prints the table for
docs/distributed.md.

    python scripts/train_processes.py [--steps 10] [--eval-examples 64]

One process uses every core; each of two uses half of them (OMP_NUM_THREADS), so on one
machine the processes share the same cores: the figure says what the launcher costs and what
the split evaluation saves, not what a second machine would add.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="the global batch")
    args = parser.parse_args()
    cores = os.cpu_count() or 2
    common = ["train", "--max-steps", str(args.steps), "--eval-examples", str(args.eval_examples)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for processes in (1, 2):
            out = Path(tmp) / f"p{processes}"
            argv = [*common, "--batch-size", str(args.batch // processes), "--output", str(out)]
            if processes == 1:
                command = [sys.executable, "-m", "paca.cli", *argv]
            else:
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
                command += ["--nproc-per-node", str(processes), "-m", "paca.cli", *argv]
            env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // processes)))
            subprocess.run(command, check=True, env=env)
            metrics = json.loads((out / "metrics.json").read_text())
            rows[processes] = {
                "threads_per_process": max(1, cores // processes),
                "steps_per_s": round(1 / metrics["train"]["seconds_per_step"], 3),
                "evaluation_seconds": metrics["evaluation_seconds"],
                "after": metrics["after"],
                "precision": metrics["precision"]["used"],
            }
    result = {"steps": args.steps, "global_batch": args.batch, "cores": cores, "runs": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_processes.json").write_text(json.dumps(result, indent=2) + "\n")
    print("| processes | steps/s | evaluation before, after (s) | after: loss, exact match |")
    print("|---|---|---|---|")
    for n, row in rows.items():
        after = next(iter(row["after"].values()))
        seconds = row["evaluation_seconds"]
        print(f"| {n} | {row['steps_per_s']:.3f} | {seconds.get('before')}, {seconds['after']} | "
              f"{after['loss']:.4f}, {after.get('exact_match', float('nan')):.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
