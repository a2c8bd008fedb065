"""One error base class, one missing-dependency error, and the CLI's two ways of failing: one
line for bad input, a traceback for a bug."""

import pytest

import paca
from paca.cli import main
from paca.errors import MissingDependency, PacaError, require


def test_library_errors_are_paca_errors_and_value_errors():
    with pytest.raises(PacaError) as info:
        paca.PacaConfig(r=0)
    assert isinstance(info.value, ValueError)  # what paca 0.1 raised: old handlers still work


def test_missing_dependency_names_the_package_the_use_and_the_extra():
    with pytest.raises(MissingDependency) as info:
        require("paca_no_such_package_xyz", "selection='magic'", "magic")
    message = str(info.value)
    assert "selection='magic' needs paca_no_such_package_xyz" in message
    assert "pip install 'paca[magic]'" in message
    assert isinstance(info.value, ImportError) and isinstance(info.value, PacaError)


def test_an_import_error_inside_an_installed_package_is_not_called_missing(tmp_path, monkeypatch):
    (tmp_path / "paca_broken_pkg.py").write_text("import paca_dependency_it_lacks\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="paca_dependency_it_lacks"):
        require("paca_broken_pkg", "a feature", "extra")


def test_cli_user_error_is_one_line_with_flags(tmp_path, capsys):
    argv = ["export-lora", "--model", str(tmp_path), "--adapter", str(tmp_path)]
    (tmp_path / "out").mkdir()
    assert main([*argv, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    # the library's "output=... pass force=True" speaks this command's flags
    assert f"--output {tmp_path / 'out'} exists" in err and "pass --force" in err, err


def test_cli_bug_keeps_its_traceback(monkeypatch):
    from paca.recipes import train

    def broken(cfg):
        raise KeyError("an internal bug")

    monkeypatch.setattr(train, "run", broken)
    with pytest.raises(KeyError, match="an internal bug"):
        main(["train", "--output", "/tmp/paca-never-written"])
