#!/usr/bin/env bash
# Installs paca with its dev extra into the active Python. torch comes first, as the local CPU
# build: a bare "torch" requirement on a machine without it would pull a multi-GB CUDA build.
set -euo pipefail
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
# deepspeed and trl too (tests/test_deepspeed.py, tests/test_trl.py): not in dev, so the README's
# line stays lean and the Gaudi pins (transformers 4.55, which trl 1.16 refuses) still resolve
python -m pip install --quiet -e ".[dev,deepspeed,trl]"
python -c "import torch, transformers, paca; print('torch', torch.__version__, '| transformers', transformers.__version__, '| paca', paca.__version__)"
