# CI only, never shipped: a stand-in for the CUDA and Gaudi bases where neither can be pulled
# (ci/docker.sh builds it and both images on top of it; docker/README.md says what that proves).
# Debian bookworm, python3 and a virtual environment with a CPU torch on PATH: the contract the
# two Dockerfiles expect of BASE_IMAGE and BUILDER_IMAGE. DEBIAN_IMAGE is a minbase debootstrap
# imported into podman, since no image registry may be reachable. torch comes from /wheels when
# the build mounts a folder holding a CPU wheel there (ci/docker.sh does); else from the index.
ARG DEBIAN_IMAGE=localhost/paca-debian-min:bookworm
FROM ${DEBIAN_IMAGE}

ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:${PATH}

# no version pins: this base is debootstrapped from bookworm at its current point release
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --find-links /wheels "torch==${TORCH_VERSION}" \
    && python -c "import torch; print('stand-in base: torch', torch.__version__)"
