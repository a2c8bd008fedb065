"""scripts/smollm2_report.py: the accuracy study's figures in docs/accuracy.md and the README
are computed from the committed run cache, and its verdict rule says what it claims."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
try:
    import smollm2_report as report
    import smollm2_study as study
finally:
    sys.path.pop(0)


def test_the_documents_say_what_the_committed_cache_says():
    """Rerunning the report on the committed cache changes nothing: no figure was typed or
    left behind by a cache update (fix: python scripts/smollm2_report.py)."""
    for path, (now, expected) in report.render(study.Study(study.CACHE, dry=True)).items():
        assert now == expected, f"{path} is out of date with the run cache"


def test_the_verdict_rule():
    # every seed agrees and the mean is far beyond its standard error: a difference
    assert report.compare([3.0, 3.1, 3.2], [3.2, 3.3, 3.4], lower_better=True)[0] == "ahead"
    assert report.compare([3.2, 3.3, 3.4], [3.0, 3.1, 3.2], lower_better=True)[0] == "behind"
    word, mean, diffs = report.compare([80.0, 81.0], [79.0, 79.5], lower_better=False)
    assert (word, mean, diffs) == ("ahead", 1.25, [1.0, 1.5])
    # seeds disagree on the sign: level, whatever the mean
    assert report.compare([3.0, 3.5, 3.0], [3.2, 3.2, 3.2], lower_better=True)[0] == "level"
    # consistent, but within what the split resolves (exact match: a point)
    assert report.compare([80.5, 80.6], [80.0, 80.0], False, floor=1.0)[0] == "level"
    # consistent, but the mean is within twice its standard error
    assert report.compare([3.0, 3.19, 3.0], [3.01, 3.2, 3.3], lower_better=True)[0] == "level"


def _run(split, loss, params):
    return {
        "after": {split: {"loss": loss, "token_accuracy": 0.4}},
        "before": {split: {"loss": 3.8, "token_accuracy": 0.3}},
        "train": {"seconds_per_step": 4.0},
        "trainable_params": params,
    }


def _synthetic(tmp_path, lora_best: float):
    """Results from a cache with PaCA r16's and LoRA r8's loss-task sweeps and test seeds only;
    ``lora_best``: LoRA's validation loss at its chosen rate (4e-3)."""
    cache = tmp_path / "runs.json"
    s = study.Study(cache, dry=True)
    runs = {}
    loss = {"PaCA r16": {5e-3: 3.10, 1e-2: 3.00, 2e-2: 3.05}, "LoRA r8": {2e-3: 3.2, 4e-3: 3.1}}
    loss["LoRA r8"] |= {4e-3: lora_best, 8e-3: 3.15}
    tests = {"PaCA r16": [2.90, 2.92, 2.95], "LoRA r8": [2.99, 3.00, 3.02]}
    params = {"PaCA r16": 2488320, "LoRA r8": 2442240}
    for label, sweep in loss.items():
        spec = s.spec(s.configs[report.LOSS[label]])
        for lr, value in sweep.items():
            key = study.run_key(lr=lr, seed=0, split="validation", **spec)
            runs[key] = _run("validation", value, params[label])
        best = min(sweep, key=sweep.get)
        for seed, value in zip(study.SEEDS, tests[label], strict=True):
            key = study.run_key(lr=best, seed=seed, split="test", **spec)
            runs[key] = _run("test", value, params[label])
    cache.write_text(json.dumps(runs))
    return report.Results(study.Study(cache, dry=True))


def test_a_partial_cache_reports_what_ran_and_marks_the_rest(tmp_path):
    """A synthetic cache: PaCA r16's and LoRA r8's loss-task sweeps and test seeds done, the
    others not. The tables show the cached numbers, the chosen rates, paired differences, and
    'pending' for the rest; the verdict names the result."""
    res = _synthetic(tmp_path, lora_best=3.1)
    section = report.loss_task_section(res)
    assert "| PaCA r16, alpha 32 | 5e-3 3.100 (40.0%), 1e-2 **3.000** (40.0%), 2e-2" in section
    assert "| LoRA r8 | 2,442,240 | 4e-3 | 2.990, 3.000, 3.020 | **3.003 ± 0.015** |" in section
    assert "PaCA r16 against LoRA r8, by seed -0.090, -0.080, -0.070 nats" in section
    assert "| PaCA r8 |  | - | sweep still running | pending | |" in section
    # seed 0: -0.10 on validation (3.00 - 3.10), -0.09 on test (2.90 - 2.99): a 0.01 floor
    assert report.loss_resolution(res) == pytest.approx(0.01)
    assert "differ by -0.100 nats on validation and -0.090 on test" in " ".join(section.split())
    doc, readme = report.verdict(res)
    doc = " ".join(doc.split())  # as read, not as wrapped
    assert (
        "PaCA r16 2.923 ± 0.025 against LoRA r8 3.003 ± 0.015 nats (paired -0.080 nats, a "
        "perplexity 7.7% lower; next-token accuracy 40.0% against 40.0%): PaCA is ahead of" in doc
    )
    assert "PaCA r 16 is ahead of LoRA r 8" in readme
    assert "At equal wall time, long answers (answer loss): not run yet." in doc


def test_a_document_without_its_block_is_refused():
    with pytest.raises(SystemExit, match="smollm2-report:verdict"):
        report.splice("no markers here", "verdict", "text", "README.md")
    text = "a <!-- smollm2-report:x -->old<!-- /smollm2-report:x --> b"
    assert report.splice(text, "x", "new", "f") == text.replace("old", "new")


def test_the_rate_moves_name_the_old_and_the_new_rate():
    """From the committed cache, whose two sweeps are complete: PaCA r16's rate moved between
    the tasks (with its validation loss at both), LoRA r8's did not."""
    res = report.Results(study.Study(study.CACHE, dry=True))
    moved = " ".join(report.rate_moves(res).split())
    assert "PaCA r16 chose 2.5e-3 here against 1e-2 on the exact-match task" in moved
    assert "its validation loss at 1e-2 is 3.095 against 3.043 at 2.5e-3" in moved
    assert "LoRA r8 chose 4e-3 on both tasks" in moved


def test_a_loss_edge_within_what_the_split_resolves_is_level(tmp_path):
    """The same test seeds as above, but LoRA's seed-0 model scores 2.95 on validation: the
    pair's difference moves from +0.05 to -0.09 between the splits, beyond the mean edge of
    0.08, so the verdict calls it level."""
    res = _synthetic(tmp_path, lora_best=2.95)
    assert report.loss_resolution(res) == pytest.approx(0.14)
    doc = " ".join(report.verdict(res)[0].split())
    assert "): PaCA is level with LoRA." in doc


def test_equal_time_steps_come_from_each_tasks_own_step_times(tmp_path, monkeypatch):
    """The budget converts through the measured step times of the configuration's own task (the
    loss task's or the exact-match task's), and a configuration nobody timed is refused."""
    times = {
        "loss task": {"PaCA r16": {"median_s": 2.0}, "LoRA r8": {"median_s": 2.5}},
        "exact-match task": {"PaCA r16": {"median_s": 2.0}, "LoRA r8": {"median_s": 2.2}},
    }
    (tmp_path / study.STEP_TIMES).write_text(json.dumps(times))
    monkeypatch.setattr(study, "RESULTS", tmp_path)
    configs = {c.name: c for c in study.CONFIGS}
    loss = configs["LoRA r8, equal time, loss task"]
    assert study.equal_time_steps(loss, configs[loss.budget], 100) == 80
    short = configs["LoRA r8, equal time"]
    assert study.equal_time_steps(short, configs[short.budget], 100) == 91
    with pytest.raises(SystemExit, match="no step time"):
        study.step_seconds(configs["PaCA r16, attention only, loss task"])
