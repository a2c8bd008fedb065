"""The examples run as documented (on the CPU, with their --tiny --cpu switches)."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_gaudi_example_runs_on_cpu_and_writes_an_adapter(tmp_path):
    script = EXAMPLES / "gaudi" / "train.py"
    command = [sys.executable, str(script), "--tiny", "--cpu", "--max-steps", "4"]
    command += ["--r", "4", "--batch-size", "4", "--output", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "adapter" / "adapter.safetensors").is_file()
    checkpoint = tmp_path / "out" / "checkpoint-4"
    assert (checkpoint / "adapter.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()
