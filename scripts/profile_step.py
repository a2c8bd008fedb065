"""Where a training step's time goes: ``torch.profiler`` over a few steps of one bench method
on a bench workload, against the frozen model, by ATen op (self CPU time, ms per step).

    python scripts/profile_step.py [--preset smollm2] [--method paca] [--optim fused] [--steps 3]
    python scripts/profile_step.py --cprofile   # Python-level: cProfile of the method's steps
    python scripts/profile_step.py --anatomy    # PaCA's step in parts, timed, no profiler

``--anatomy`` times (medians of interleaved rounds, no profiler in the way) the frozen model's
forward + backward, PaCA's, PaCA's with its layers computing the frozen GEMM only (no autograd
function, no delta gradients: what is left is the model itself), the partial-gradient kernel
inside PaCA's backward, the optimizer step with the column write, and each one's minor page
faults (fresh memory mapped and zeroed: glibc's heap trimming shows there).

Prints the step times and the ops whose time differs most between the method and the frozen
model. CPU only (on a GPU read the CUDA columns of the profiler instead).
"""

import argparse
import statistics
import time
import types
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from paca import ops
from paca.layer import PacaLinear
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


def anatomy(cfg, base, embeds, labels, rounds: int) -> None:
    device = torch.device("cpu")
    frozen, _ = bench.prepare("frozen", base, cfg, device)
    paca_model, optimizer = bench.prepare("paca", base, cfg, device)
    gemm_only, _ = bench.prepare("paca", base, cfg, device)
    for layer in gemm_only.modules():
        if isinstance(layer, PacaLinear):  # the same weight, the frozen layer's own forward
            layer.forward = types.MethodType(lambda self, x: self.base_layer(x), layer)
    table = ops._BY_DEVICE.setdefault("cpu", dict(ops.REFERENCE))
    kernel, in_kernel = table["partial_grad"], []

    def timed_kernel(*args):
        start = time.perf_counter()
        out = kernel(*args)
        in_kernel.append(time.perf_counter() - start)
        return out

    times: dict[str, list[float]] = defaultdict(list)
    faults: dict[str, list[int]] = defaultdict(list)

    def measure(name, fn):
        flt, start = bench._minor_faults(), time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
        faults[name].append(bench._minor_faults() - flt)

    def forward_backward(model):
        x = embeds.detach().requires_grad_(True)
        model(inputs_embeds=x, labels=labels).loss.backward()

    table["partial_grad"] = timed_kernel
    try:
        for round_index in range(rounds + 1):  # the first round warms up
            in_kernel.clear()
            measure("frozen forward+backward", lambda: forward_backward(frozen))
            measure("paca forward+backward", lambda: forward_backward(paca_model))
            times["  partial_grad kernels in it"].append(sum(in_kernel))  # inside the line above
            measure("paca optimizer step + column write", optimizer.step)
            measure("paca zero_grad", lambda: optimizer.zero_grad(set_to_none=True))
            measure("paca layers as frozen GEMMs, fwd+bwd", lambda: forward_backward(gemm_only))
            if round_index == 0:
                times.clear()
                faults.clear()
    finally:
        table["partial_grad"] = kernel
    reference = statistics.median(times["frozen forward+backward"])
    print(f"{cfg.model} hidden {cfg.hidden}, {cfg.layers} layers, seq {cfg.seq}, batch "
          f"{cfg.batch}, AdamW {cfg.optim}: medians of {rounds} interleaved rounds")  # fmt: skip
    print(f"{'part':40s} {'ms':>8s} {'x frozen fwd+bwd':>17s} {'minor faults':>13s}")
    for name, values in times.items():
        ms = statistics.median(values)
        counted = f"{statistics.median(faults[name]):13.0f}" if name in faults else f"{'-':>13s}"
        print(f"{name:40s} {1e3 * ms:8.1f} {ms / reference:17.3f} {counted}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="smollm2")
    parser.add_argument("--method", default="paca")
    parser.add_argument("--optim", default="fused")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--cprofile", action="store_true", help="cProfile the method's steps")
    parser.add_argument("--anatomy", action="store_true", help="PaCA's step in timed parts")
    parser.add_argument("--rounds", type=int, default=7, help="--anatomy: interleaved rounds")
    args = parser.parse_args()
    cfg = bench.BenchConfig.preset(args.preset, optim=args.optim, peak_memory=False)
    base = bench.build_model(cfg)
    device = torch.device("cpu")
    embeds, labels = bench.make_inputs(base, cfg, device)
    if args.anatomy:
        anatomy(cfg, base, embeds, labels, args.rounds)
        return
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
