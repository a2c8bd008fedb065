"""The SmolLM2 study's report: the verdict at the top of docs/accuracy.md, its sections on the
loss task and on equal training time, and the README's sentence on them, all computed from the
run cache of ``scripts/smollm2_study.py`` (nothing trains here; a part whose runs have not
finished says so and shows what has).

Each generated block sits between ``<!-- smollm2-report:NAME -->`` and
``<!-- /smollm2-report:NAME -->``; the text around them is written by hand.
``tests/test_study_report.py`` checks that the committed documents equal what this script
writes from the committed cache, so the figures are never typed.

    python scripts/smollm2_report.py            # rewrite the blocks
    python scripts/smollm2_report.py --check    # exit 1 where a document is out of date
"""

import argparse
import json
import math
import re
import statistics
import sys
import textwrap
from pathlib import Path

from smollm2_study import (
    CACHE,
    CONFIGS,
    CONTINUE,
    DOCS,
    PACA16,
    RESULTS,
    SEEDS,
    STEP_TIMES,
    Study,
    equal_time_steps,
    run_key,
    step_seconds,
)

ROOT = DOCS.parent
TARGETS = {"accuracy": DOCS / "accuracy.md", "readme": ROOT / "README.md"}
# the loss task's four configurations, each at its own rate (display name -> configuration)
LOSS = {
    "PaCA r16": "PaCA r16, loss task",
    "LoRA r8": "LoRA r8, loss task",
    "PaCA r8": "PaCA r8, loss task",
    "full fine-tuning": "full fine-tuning, loss task",
}
# the loss task before its own sweeps: bf16 frozen weights, the rates of the exact-match task
LOSS_BEFORE = {"PaCA r16": "PaCA r16, docstring-continue", "LoRA r8": "LoRA r8, docstring-continue"}
# equal wall time, per task: the budget's configuration, then each method's equal-time and
# equal-step configurations
EQUAL = {
    "long answers (answer loss)": (
        "PaCA r16, loss task",
        {n: (f"{n}, equal time, loss task", f"{n}, loss task") for n in LOSS if n != "PaCA r16"},
    ),
    "short answers (exact match)": (
        "PaCA r16, fp32",
        {
            "LoRA r8": ("LoRA r8, equal time", "LoRA r8"),
            "PaCA r8": ("PaCA r8, equal time", "PaCA r8, fp32"),
            "full fine-tuning": ("full fine-tuning, equal time", "full fine-tuning"),
        },
    ),
}


def prose(lines: list[str]) -> str:
    """Paragraphs and bullets wrapped at 96 columns, as the hand-written text around them."""
    wrapped = []
    for line in lines:
        indent = "  " if line.startswith("- ") else ""
        wrapped.append(textwrap.fill(line, 96, subsequent_indent=indent) if line else "")
    return "\n".join(wrapped)


def lr_text(lr: float) -> str:
    """5e-3, 1.25e-3: the rate as the documents write it."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def compare(ours: list[float], theirs: list[float], lower_better: bool, floor: float = 0.0):
    """Paired by seed: each difference signed so that positive means ``ours`` is better, their
    mean, and a word: ``ahead``/``behind`` when every seed agrees on the sign and the mean is
    beyond twice its standard error and ``floor`` (what the split resolves), else ``level``."""
    diffs = [(b - a) if lower_better else (a - b) for a, b in zip(ours, theirs, strict=True)]
    mean = statistics.mean(diffs)
    error = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else math.inf
    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
    if same_sign and abs(mean) > max(2 * error, floor):
        return ("ahead" if mean > 0 else "behind"), mean, diffs
    return "level", mean, diffs


def spread(values: list[float], digits: int) -> str:
    if len(values) < 2:
        return f"{values[0]:.{digits}f} (one seed)"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


class Results:
    """What the cache says about each configuration (``dry`` study: nothing trains)."""

    def __init__(self, study: Study):
        self.study = study
        self.configs = {c.name: c for c in CONFIGS}

    def finals(self, name: str) -> tuple[float | None, list[dict]]:
        """The chosen rate (None while the sweep runs) and the test runs cached at it."""
        return self.study.cached_finals(self.configs[name])

    def complete(self, name: str) -> bool:
        best, runs = self.study.cached_finals(self.configs[name])
        return best is not None and len(runs) == len(SEEDS)

    def steps(self, name: str) -> int:
        return self.study.spec(self.configs[name])["steps"]


def metric(run: dict, loss_task: bool) -> float:
    after = run["after"]["test"]
    return after["loss"] if loss_task else 100 * after["exact_match"]


def zero_shot(runs: dict, split: str, loss_task: bool) -> dict | None:
    """The base model's score on a split (scored once, by the first run of its task)."""
    suffix = f"-{split}-{CONTINUE}-fp32" if loss_task else f"-{split}"
    for key, run in runs.items():
        if key.endswith(suffix) and run["before"].get(split):
            return run["before"][split]
    return None


def loss_task_section(res: Results) -> str:
    study = res.study
    out = []
    out.append(
        "Validation sweeps (seed 0, 150 examples; answer loss in nats per token, lower is "
        "better, and next-token accuracy on the answers):\n"
    )
    out.append("| configuration | learning rate: answer loss (token accuracy) | chosen |")
    out.append("|---|---|---|")
    base = zero_shot(study.runs, "validation", True)
    if base:
        out.append(
            f"| zero-shot base | {base['loss']:.3f} ({100 * base['token_accuracy']:.1f}%) | - |"
        )
    for label, name in LOSS.items():
        c = res.configs[name]
        sweep = study.cached_sweep(c)
        best = study.cached_finals(c)[0]
        cells = ", ".join(
            f"{lr_text(lr)} "
            + ("**" if lr == best else "")
            + f"{m['after']['validation']['loss']:.3f}"
            + ("**" if lr == best else "")
            + f" ({100 * m['after']['validation']['token_accuracy']:.1f}%)"
            for lr, m in sweep.items()
        )
        chosen = lr_text(best) if best is not None else "sweep still running"
        label += f", alpha {c.alpha:g}" if c.method != "full" else ""
        out.append(f"| {label} | {cells or 'not run yet'} | {chosen} |")
    out.append("")
    out.append("Test split (332 examples), 3 seeds at the chosen rate:\n")
    out.append(
        "| configuration | trainable params | lr | answer loss, seeds 0, 1, 2 | mean ± sd "
        "| token accuracy % |"
    )
    out.append("|---|---|---|---|---|---|")
    base = zero_shot(study.runs, "test", True)
    if base:
        out.append(
            f"| zero-shot base | 0 | - | {base['loss']:.3f} | {base['loss']:.3f} "
            f"| {100 * base['token_accuracy']:.1f} |"
        )
    losses = {}
    for label, name in LOSS.items():
        best, runs = res.finals(name)
        c = res.configs[name]
        cached = runs or list(study.cached_sweep(c).values())
        params = f"{cached[0]['trainable_params']:,}" if cached else ""
        if best is None:
            out.append(f"| {label} | {params} | - | sweep still running | pending | |")
            continue
        values = [metric(r, True) for r in runs]
        accuracy = [100 * r["after"]["test"]["token_accuracy"] for r in runs]
        seeds = ", ".join(f"{v:.3f}" for v in values) or "-"
        if len(values) == len(SEEDS):
            losses[label] = values
            total, acc = f"**{spread(values, 3)}**", spread(accuracy, 1)
        else:
            total, acc = f"pending ({len(values)} of {len(SEEDS)} seeds)", ""
        out.append(f"| {label} | {params} | {lr_text(best)} | {seeds} | {total} | {acc} |")
    out.append("")
    if "LoRA r8" in losses:
        lines = []
        for label, values in losses.items():
            if label == "LoRA r8":
                continue
            word, mean, diffs = compare(values, losses["LoRA r8"], lower_better=True)
            by_seed = ", ".join(f"{-d:+.3f}" for d in diffs)
            lines.append(
                f"- {label} against LoRA r8, by seed {by_seed} nats (mean {-mean:+.3f}): "
                + {"level": "level", "ahead": f"{label} ahead", "behind": f"{label} behind"}[word]
            )
        if lines:
            out.append("Differences in answer loss, paired by seed (negative: lower loss than "
                       "LoRA r8):\n")  # fmt: skip
            out.append(prose(lines))
            out.append("")
        pair = seed0_pair(res)
        if pair:
            text = (
                f"What the split resolves: the seed-0 models of PaCA r16 and LoRA r8 (the "
                f"sweep's runs at the chosen rates train exactly these) differ by "
                f"{pair[0]:+.3f} nats on validation and {pair[1]:+.3f} on test; which examples "
                f"are scored moves a difference by {abs(pair[0] - pair[1]):.3f} nats, so a mean "
                f"difference within that is called level (the verdict's floor for answer loss)."
            )
            out.append(prose([text]))
            out.append("")
    before = []
    for label, name in LOSS_BEFORE.items():
        best, runs = res.finals(name)
        if best is not None and runs:
            values = [metric(r, True) for r in runs]
            before.append(f"{label} {spread(values, 3)} (lr {lr_text(best)})")
    if before:
        text = (
            "Before these sweeps (bf16 frozen weights, each method at the rate it chose on the "
            "exact-match task): " + " against ".join(before) + " on the same test split."
        )
        out.append(prose([text]))
        moved = rate_moves(res)
        if moved:
            out.append("")
            out.append(prose([moved]))
    return "\n".join(out)


def rate_moves(res: Results) -> str:
    """How far each method's rate moved from the exact-match task's to this task's own, and
    what that rate costs on this task's validation split: where the earlier gap came from."""
    parts = []
    for label, old_name in LOSS_BEFORE.items():
        old, _ = res.finals(old_name)
        new = res.finals(LOSS[label])[0]
        if old is None or new is None:
            continue
        sweep = res.study.cached_sweep(res.configs[LOSS[label]])
        if old == new:
            parts.append(f"{label} chose {lr_text(new)} on both tasks")
        elif old in sweep:
            at = {lr: sweep[lr]["after"]["validation"]["loss"] for lr in (old, new)}
            parts.append(
                f"{label} chose {lr_text(new)} here against {lr_text(old)} on the exact-match "
                f"task, and its validation loss at {lr_text(old)} is {at[old]:.3f} against "
                f"{at[new]:.3f} at {lr_text(new)}"
            )
        else:
            parts.append(f"{label} chose {lr_text(new)} here against {lr_text(old)} there")
    if not parts:
        return ""
    return "Where the rates moved: " + "; ".join(parts) + "."


def step_times(res: Results) -> str:
    """The measured step times each equal-time budget is converted with (the study's way, each
    method in a process of its own), the bench way's ratio beside them, and the seconds per step
    the study's own runs recorded."""
    study = res.study
    measured = json.loads((RESULTS / STEP_TIMES).read_text())
    short = EQUAL["short answers (exact match)"][1]
    out = [
        "| method | loss task: s/step | x PaCA r16 | steps in PaCA r16's time for 100 "
        "| exact-match task: s/step | x PaCA r16 | steps | bench way: x PaCA r16 "
        "| the study's own fp32 runs: s/step (median, runs) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, name in LOSS.items():
        cells = [label]
        for budget_name, c_name in [
            ("PaCA r16, loss task", name),
            ("PaCA r16, fp32", short.get(label, ("PaCA r16, fp32",))[0]),
        ]:
            c, budget = res.configs[c_name], res.configs[budget_name]
            seconds = step_seconds(c)
            steps = equal_time_steps(c, budget, study.steps)
            cells += [f"{seconds:.2f}", f"{seconds / step_seconds(budget):.3f}", str(steps)]
        cells.append(f"{measured['bench'][label]['x_paca_r16']:.3f}")
        c = res.configs[name]
        own = [
            run["train"]["seconds_per_step"]
            for key, run in study.runs.items()
            if key.startswith(f"{c.method}-r{c.r}-") and key.endswith("-fp32")
            and "train" in run and run["train"].get("seconds_per_step")
        ]  # fmt: skip
        cells.append(f"{statistics.median(own):.2f} ({len(own)})" if own else "-")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append(prose([f"(Measured: `docs/results/{STEP_TIMES}`, {measured['processes']}.)"]))
    return "\n".join(out)


def equal_time_section(res: Results) -> str:
    out = [step_times(res), ""]
    for task, (budget, methods) in EQUAL.items():
        loss_task = task.startswith("long")
        unit = "answer loss" if loss_task else "exact match %"
        digits = 3 if loss_task else 1
        out.append(f"{task[0].upper()}{task[1:]}, test split, 3 seeds:\n")
        out.append(f"| configuration | steps | {unit} at equal time | at 100 steps |")
        out.append("|---|---|---|---|")
        _, runs = res.finals(budget)
        ref = [metric(r, loss_task) for r in runs]
        cell = spread(ref, digits) if len(ref) == len(SEEDS) else f"pending ({len(ref)} of 3)"
        out.append(f"| PaCA r16 (the budget) | 100 | {cell} | {cell} |")
        for label, (timed, stepped) in methods.items():
            _, runs = res.finals(timed)
            at_time = [metric(r, loss_task) for r in runs]
            _, runs = res.finals(stepped)
            at_steps = [metric(r, loss_task) for r in runs]
            cells = [
                spread(v, digits) if len(v) == len(SEEDS) else f"pending ({len(v)} of 3)"
                for v in (at_time, at_steps)
            ]
            precision = res.configs[stepped].precision
            note = " (bf16 frozen weights)" if precision == "bf16" else ""
            out.append(f"| {label} | {res.steps(timed)} | {cells[0]} | {cells[1]}{note} |")
        out.append("")
    return "\n".join(out).rstrip()


def seed0_pair(res: Results) -> tuple[float, float] | None:
    """PaCA r16's minus LoRA r8's answer loss for their seed-0 models at the chosen rates, on
    validation and on test: the sweep's run at the chosen rate trains exactly the model the
    seed-0 test run trains (same seed, data and settings), so the two differ only in which
    examples are scored. None until both runs of both methods are cached."""
    out = []
    for split in ("validation", "test"):
        losses = []
        for name in (LOSS["PaCA r16"], LOSS["LoRA r8"]):
            c = res.configs[name]
            best = res.finals(name)[0]
            key = run_key(lr=best, seed=SEEDS[0], split=split, **res.study.spec(c))
            if best is None or key not in res.study.runs:
                return None
            losses.append(res.study.runs[key]["after"][split]["loss"])
        out.append(losses[0] - losses[1])
    return out[0], out[1]


def loss_resolution(res: Results) -> float:
    """What the loss task's splits resolve: how far the seed-0 pair's difference moves between
    validation and test (0 until both are cached, then the verdict's floor for answer loss)."""
    pair = seed0_pair(res)
    return abs(pair[0] - pair[1]) if pair else 0.0


def outcome(res: Results, ours: str, theirs: str, loss_task: bool) -> tuple | None:
    """(word, paired mean, our mean, their mean) where both configurations have all seeds."""
    if not (res.complete(ours) and res.complete(theirs)):
        return None
    a = [metric(r, loss_task) for r in res.study.cached_finals(res.configs[ours])[1]]
    b = [metric(r, loss_task) for r in res.study.cached_finals(res.configs[theirs])[1]]
    # exact match: a point is at the edge of what 632 examples resolve (docs/accuracy.md);
    # answer loss: what the seed-0 pair's move between the splits shows (loss_resolution)
    floor = loss_resolution(res) if loss_task else 1.0
    word, mean, _ = compare(a, b, lower_better=loss_task, floor=floor)
    return word, mean, spread(a, 3 if loss_task else 1), spread(b, 3 if loss_task else 1)


def loss_size(res: Results, ours: str, theirs: str, mean: float) -> str:
    """A loss difference in words a reader can weigh: the paired mean, the perplexity ratio it
    is, and both sides' next-token accuracy (which a small loss difference need not move)."""
    accuracy = [
        statistics.mean(
            100 * r["after"]["test"]["token_accuracy"]
            for r in res.study.cached_finals(res.configs[name])[1]
        )
        for name in (ours, theirs)
    ]
    return (
        f"paired {mean:+.3f} nats, a perplexity {abs(math.expm1(mean)) * 100:.1f}% "
        f"{'lower' if mean < 0 else 'higher'}; next-token accuracy {accuracy[0]:.1f}% against "
        f"{accuracy[1]:.1f}%"
    )


def verdict(res: Results) -> tuple[str, str]:
    """The verdict's paragraph for docs/accuracy.md and the README's sentence."""
    short = outcome(res, PACA16, "LoRA r8", False)
    long = outcome(res, "PaCA r16, loss task", "LoRA r8, loss task", True)
    timed = {
        task: outcome(res, budget, methods["LoRA r8"][0], task.startswith("long"))
        for task, (budget, methods) in EQUAL.items()
    }
    words = {"level": "level with", "ahead": "ahead of", "behind": "behind"}
    lines = ["**Verdict** (SmolLM2-135M-Instruct on 2 CPU cores; the limits are below):", ""]
    if short:
        lines.append(
            f"- Short answers (exact match, 100 steps): PaCA r16 {short[2]} against LoRA r8 "
            f"{short[3]}: PaCA is {words[short[0]]} LoRA."
        )
    if long:
        lines.append(
            f"- Long answers (answer loss, each method at the rate of its own sweep, 100 steps): "
            f"PaCA r16 {long[2]} against LoRA r8 {long[3]} nats ("
            + loss_size(res, "PaCA r16, loss task", "LoRA r8, loss task", -long[1])
            + f"): PaCA is {words[long[0]]} LoRA."
        )
    else:
        lines.append(
            "- Long answers (answer loss, each method at its own rate): not settled yet; the "
            "sweeps are running (below: what has run)."
        )
    for task, result in timed.items():
        if result:
            budget, methods = EQUAL[task]
            size = (
                " (" + loss_size(res, budget, methods["LoRA r8"][0], -result[1]) + ")"
                if task.startswith("long")
                else ""
            )
            lines.append(
                f"- At equal wall time, {task}: PaCA r16 {result[2]} against LoRA r8 "
                f"{result[3]}{size}: PaCA is {words[result[0]]} LoRA."
            )
        else:
            lines.append(f"- At equal wall time, {task}: not run yet.")
    lines.append("")
    if long is None:
        advice = (
            "Until the loss task is settled: PaCA matches LoRA where answers are short; for "
            "long-form answers the earlier gap (below) came with rates chosen on the other task "
            "and is being measured again."
        )
        readme = (
            "on a second task with long answers, scored by answer loss, the comparison with "
            "each method at the rate of its own sweep is still running (`docs/accuracy.md`)"
        )
    elif long[0] == "behind":
        advice = (
            f"Where answers are long, LoRA r8 reached a lower loss than PaCA r16 here "
            f"({-long[1]:+.3f} nats, paired); where they are short, PaCA matches it."
        )
        readme = (
            f"on a second task with long answers, each method at its own best rate, LoRA r 8 "
            f"reaches a lower answer loss ({long[3]} against PaCA r 16's {long[2]} nats)"
        )
    else:
        advice = (
            "PaCA can replace LoRA at the same trainable budget on both kinds of answer here, "
            "each at its own learning rate (sweep it: the two methods' best rates differ)."
        )
        readme = (
            f"on a second task with long answers, each method at its own best rate, PaCA r 16 "
            f"is {words[long[0]]} LoRA r 8 ({long[2]} against {long[3]} nats of answer loss)"
        )
    done = {task.split(" (")[0]: result for task, result in timed.items() if result}
    if done:  # the equal-time results so far, in the README's sentence too
        readme += (
            "; at equal wall time on this CPU (PaCA r 16's time for 100 steps), PaCA r 16 is "
            + " and ".join(f"{words[r[0]]} LoRA r 8 on {task}" for task, r in done.items())
        )
    lines.append(advice)
    lines.append("")
    lines.append(
        "What this cannot tell: the weights are the dequantized Q4_1 GGUF of "
        "SmolLM2-135M-Instruct, trained for 100 steps of 8 on a few hundred examples on a CPU; "
        "whether the same holds for 7B+ models, long runs on large sets, or a GPU's step times "
        "(equal time depends on them) is not measured here."
    )
    return prose(lines), readme


def blocks(study: Study) -> dict[str, dict[str, str]]:
    """Every generated block, by document and name."""
    res = Results(study)
    doc_verdict, readme = verdict(res)
    return {
        "accuracy": {
            "verdict": doc_verdict,
            "loss-task": loss_task_section(res),
            "equal-time": equal_time_section(res),
        },
        "readme": {"verdict": readme},
    }


def splice(text: str, name: str, body: str, where: str) -> str:
    """``text`` with the block ``name`` replaced by ``body``; the markers must be there."""
    start, end = f"<!-- smollm2-report:{name} -->", f"<!-- /smollm2-report:{name} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"{where}: needs exactly one {start} ... {end} block")
    inline = "\n" not in body
    content = f"{start}{body}{end}" if inline else f"{start}\n{body}\n{end}"
    return pattern.sub(lambda _: content, text)


def render(study: Study, root: Path = ROOT) -> dict[Path, tuple[str, str]]:
    """Each target document: (as it is, as the cache says it should be)."""
    out = {}
    for doc, named in blocks(study).items():
        path = root / TARGETS[doc].relative_to(ROOT)
        text = path.read_text()
        new = text
        for name, body in named.items():
            new = splice(new, name, body, str(path))
        out[path] = (text, new)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", default=str(CACHE))
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args()
    stale = []
    for path, (old, new) in render(Study(Path(args.cache), dry=True)).items():
        if old != new:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        sys.exit(f"out of date with the cache: {', '.join(map(str, stale))}")
    print(f"{'stale' if args.check else 'rewrote'}: {len(stale)} file(s)", file=sys.stderr)


if __name__ == "__main__":
    main()
