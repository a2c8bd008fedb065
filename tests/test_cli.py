"""The `paca` command's terminal: other packages' warnings and log lines hidden unless asked
for (``--verbose``, ``PACA_VERBOSE=1``), paca's own always shown, and nothing of that left
behind for code that calls ``main`` in-process."""

import logging
import subprocess
import sys
import warnings

import pytest

from paca import cli


def _noisy(args):
    """A command that warns and logs as paca and as other packages do."""
    warnings.warn("a third-party deprecation", FutureWarning, stacklevel=1)
    warnings.warn_explicit(
        "paca's own warning", UserWarning, "paca/model.py", 1, module="paca.model"
    )
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("bitsandbytes kernels missing")
    logging.getLogger("transformers.modeling_utils").warning("transformers says something")
    deepspeed = logging.getLogger("DeepSpeed")  # DeepSpeed logs through a handler of its own
    deepspeed.propagate = False
    handler = logging.StreamHandler()
    deepspeed.addHandler(handler)
    try:
        deepspeed.warning("Setting accelerator to CPU")
    finally:
        deepspeed.removeHandler(handler)
        deepspeed.propagate = True
    logging.getLogger("paca").warning("paca's own log line")
    logging.getLogger("accelerate").error("an error of another package")
    return 0


ALL = [
    "a third-party deprecation",
    "bitsandbytes kernels missing",
    "transformers says something",
    "Setting accelerator to CPU",
]
OWN = ["paca's own warning", "paca's own log line", "an error of another package"]


@pytest.mark.parametrize("how", ["default", "--verbose", "paca generate --verbose", "env"])
def test_other_packages_are_quiet_unless_asked(monkeypatch, capsys, how):
    monkeypatch.setattr(cli, "_run_generate", _noisy)
    monkeypatch.delenv(cli.VERBOSE_ENV, raising=False)
    argv = ["generate", "hi", "--adapter", "a"]
    if how == "--verbose":
        argv = ["--verbose", *argv]
    elif how == "paca generate --verbose":
        argv = [*argv, "--verbose"]
    elif how == "env":
        monkeypatch.setenv(cli.VERBOSE_ENV, "1")
    # as in a terminal: no handler on the root logger (pytest's own capture set aside)
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    import transformers.utils.logging  # noqa: F401  (sets up transformers' own handler)

    # transformers writes through its own handler; one made now writes to this test's stderr
    monkeypatch.setattr(logging.getLogger("transformers"), "handlers", [logging.StreamHandler()])
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")  # what a user's -W default would show
        filters = list(warnings.filters)
        assert cli.main(argv) == 0
        assert warnings.filters == filters, "the warning filters are as they were"
    err = capsys.readouterr().err + "".join(f"{w.message}\n" for w in shown)
    for text in OWN:
        assert text in err, (how, text)
    for text in ALL:
        assert (text in err) == (how != "default"), (how, text)
    assert not [h for h in logging.getLogger().handlers if type(h) is logging.StreamHandler]


def test_help_imports_no_optional_package_and_prints_nothing_else():
    code = (
        "import sys\n"
        "from paca.cli import main\n"
        "try:\n    main(['export', '--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = {'peft', 'bitsandbytes', 'deepspeed', 'trl', 'accelerate'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}), file=sys.stderr)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == "[]\n", result.stderr
    assert result.stdout.startswith("usage: paca export")
