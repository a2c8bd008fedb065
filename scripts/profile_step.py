"""Where a training step's time goes: ``torch.profiler`` over a few steps of one bench method
on a bench workload, against the frozen model, by ATen op (self CPU time, ms per step).

    python scripts/profile_step.py [--preset smollm2] [--method paca] [--optim fused] [--steps 3]
    python scripts/profile_step.py --cprofile   # Python-level: cProfile of the method's steps

Prints the step times and the ops whose time differs most between the method and the frozen
model. CPU only (on a GPU read the CUDA columns of the profiler instead).
"""

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from paca.recipes import bench


def by_op(model, optimizer, embeds, labels, steps: int) -> tuple[dict[str, list], float]:
    bench.train_step(model, optimizer, embeds, labels)  # warm
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            bench.train_step(model, optimizer, embeds, labels)
    elapsed = (time.perf_counter() - start) / steps
    table: dict[str, list] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        table[event.key][0] += event.self_cpu_time_total / 1e3 / steps
        table[event.key][1] += event.count // steps
    return table, elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="smollm2")
    parser.add_argument("--method", default="paca")
    parser.add_argument("--optim", default="fused")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--cprofile", action="store_true", help="cProfile the method's steps")
    args = parser.parse_args()
    cfg = bench.BenchConfig.preset(args.preset, optim=args.optim, peak_memory=False)
    base = bench.build_model(cfg)
    device = torch.device("cpu")
    embeds, labels = bench.make_inputs(base, cfg, device)
    frozen, _ = bench.prepare("frozen", base, cfg, device)
    model, optimizer = bench.prepare(args.method, base, cfg, device)
    if args.cprofile:
        import cProfile
        import pstats

        bench.train_step(model, optimizer, embeds, labels)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.steps):
            bench.train_step(model, optimizer, embeds, labels)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.top)
        return
    reference, frozen_ms = by_op(frozen, None, embeds, labels, args.steps)
    measured, method_ms = by_op(model, optimizer, embeds, labels, args.steps)
    print(f"{args.preset}, {args.method}, AdamW {args.optim}: step {1e3 * method_ms:.0f} ms, "
          f"frozen {1e3 * frozen_ms:.0f} ms (profiled, {args.steps} steps)")  # fmt: skip
    rows = []
    for key in set(reference) | set(measured):
        ours, theirs = measured.get(key, [0.0, 0]), reference.get(key, [0.0, 0])
        rows.append((ours[0] - theirs[0], key, ours[1], theirs[1], ours[0]))
    rows.sort(reverse=True)
    print(f"{'op':42s} {'extra ms/step':>13s} {'calls':>7s} {'frozen calls':>12s}")
    for extra, key, calls, frozen_calls, _ in rows[: args.top]:
        print(f"{key[:42]:42s} {extra:13.1f} {calls:7d} {frozen_calls:12d}")
    total = sum(r[0] for r in rows)
    print(f"{'all ops':42s} {total:13.1f}")


if __name__ == "__main__":
    main()
