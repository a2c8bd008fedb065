"""The README's quickstart works as written."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_runs_as_written(tmp_path):
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", README.read_text(), re.S)
    assert block, "README has no quickstart code block"
    result = subprocess.run(
        [sys.executable, "-c", block.group(1)], cwd=tmp_path, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "trainable params:" in result.stdout
    assert (tmp_path / "my-adapter" / "adapter.safetensors").is_file()


def test_ci_runs_the_readme_install_line_and_test_command_exactly():
    text = README.read_text()
    install = re.search(r"Install[^:]*:\n\n    (.+)\n", text).group(1)
    test = re.search(r"Run the tests:\n\n    (.+)\n", text).group(1)
    leg = (README.parent / "ci" / "readme.sh").read_text().splitlines()
    assert install in leg and test in leg, (install, test)
    assert "bash ci/readme.sh" in (README.parent / ".ci" / "run").read_text()


def test_sft_trainer_example_runs_as_written(tmp_path, tiny_llama_folder):
    import pytest

    pytest.importorskip("trl", reason="TRL (pip install 'paca[trl]')")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    block = next(b for b in blocks if "SFTTrainer" in b)
    line = next(x for x in block.splitlines() if x.startswith("MODEL = "))
    code = block.replace(line, f"MODEL = {str(tiny_llama_folder)!r}")  # no downloads here
    assert len(block.strip().splitlines()) <= 12, "the example stays short"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = tmp_path / "sft-adapter"
    assert (adapter / "adapter.safetensors").is_file()
    assert not list(adapter.glob("model*.safetensors"))
