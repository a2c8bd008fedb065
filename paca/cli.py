"""The ``paca`` command."""

from __future__ import annotations

import argparse
import dataclasses
import sys


def _bench_parser(sub) -> None:
    from paca.bench import METHODS, BenchConfig

    defaults = BenchConfig()
    p = sub.add_parser(
        "bench",
        help="PaCA against LoRA, DoRA, full fine-tuning and the frozen-model limit",
        description="Trains copies of one model with each method, interleaved round by round, "
        "and reports step time, bytes saved for backward, ATen ops per step, trainable "
        "parameters and memory. Field meanings: see paca.bench.BenchConfig.",
    )
    p.add_argument(
        "--model",
        default=defaults.model,
        help="config name (llama, mistral, qwen2) or local model folder",
    )
    for name in ("hidden", "layers", "vocab", "seq", "batch", "r", "rounds", "warmup", "seed"):
        p.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    p.add_argument("--alpha", type=float, default=defaults.alpha)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=defaults.dtype)
    p.add_argument("--device", default=defaults.device)
    p.add_argument(
        "--methods",
        default=",".join(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)}",
    )
    p.add_argument("--output", default=defaults.output)
    p.add_argument("--plot", action="store_true", help="also write bench.png (needs matplotlib)")
    p.add_argument(
        "--no-peak-memory", action="store_true", help="skip the per-method memory subprocesses"
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny shapes, one round: checks the harness"
    )
    p.add_argument(
        "--max-seq", action="store_true", help="find the longest trainable sequence per method"
    )
    p.add_argument("--memory-budget", default="4GiB", help="budget for --max-seq (e.g. 4GiB)")


def _run_bench(args, parser) -> int:
    import json
    from pathlib import Path

    from paca import bench

    fields = {f.name for f in dataclasses.fields(bench.BenchConfig)}
    settings = {k: v for k, v in vars(args).items() if k in fields}
    settings["methods"] = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings["peak_memory"] = not args.no_peak_memory
    try:
        if args.quick:
            given = {k: v for k, v in settings.items() if v != getattr(bench.BenchConfig(), k)}
            cfg = bench.BenchConfig.quick(**given)
        else:
            cfg = bench.BenchConfig(**settings)
        budget = bench.parse_bytes(args.memory_budget) if args.max_seq else None
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_seq:
        result = bench.max_seq(cfg, budget, step=16 if args.quick else 64)
        out = Path(cfg.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "max_seq.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"longest sequence within {args.memory_budget} ({cfg.model}, batch {cfg.batch}):")
        for method, row in result["methods"].items():
            ratio = f"  ({row['x_lora']:.2f}x LoRA)" if row["x_lora"] else ""
            print(f"  {method:14s} {row['max_seq']}{ratio}")
        return 0
    report = bench.run(cfg)
    print(bench.table(report))
    for name, check in report["bar"].items():
        value = "-" if check["value"] is None else f"{check['value']:.3f}"
        print(f"  {'met ' if check['met'] else 'MISS'} {name}: {value}")
    for method, why in report["skipped"].items():
        print(f"  skipped {method}: {why}")
    print(f"wrote {Path(cfg.output) / 'bench.json'} and bench.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="paca", description="Partial Connection Adaptation (PaCA) tools"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _bench_parser(sub)
    args = parser.parse_args(argv)
    command_parser = sub.choices[args.command]
    if args.command == "bench":
        return _run_bench(args, command_parser)
    parser.error(f"unknown command {args.command}")  # unreachable: argparse checks choices
    return 2


if __name__ == "__main__":
    sys.exit(main())
