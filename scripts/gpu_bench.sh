#!/usr/bin/env bash
# GPU figures for paca, in one go, on a machine with an NVIDIA GPU (or any device paca knows).
#
#   bash scripts/gpu_bench.sh                      # cuda, results in gpu-results/
#   DEVICE=cpu QUICK=1 bash scripts/gpu_bench.sh   # checks the script itself on a CPU
#
# 1. the device tests on the device's tensors (tests/test_device.py: ops, training against CPU,
#    float64 exactness, DropBP), then the whole suite unless SUITE=0;
# 2. paca bench, bf16, AdamW fused: the default shape, the SmolLM2 shape and the overhead preset
#    (SmolLM2's depth at tiny width: per-layer launch and Python costs alone), for frozen, PaCA,
#    PEFT's own PaCA (where the installed peft has it: peft >= 0.22; skipped with the reason
#    otherwise), LoRA, PaCA + DropBP 0.5, LoRA + DropBP 0.5 and a second frozen copy (the noise),
#    peak device memory per method; the SmolLM2 shape in fp32 as well;
# 3. table.md: both tables under the machine's name (GPU, driver, torch);
# 4. the default `paca train` as a newcomer runs it (SmolLM2, 100 steps, --precision auto: bf16
#    on a GPU with bf16 tensor cores), its batches' shared prompt prefix run once: wall time in
#    default-run.txt, training and evaluation seconds and exact match in its metrics.json;
# 5. with 2+ GPUs (NGPU, default: all; skipped with one): `paca train` on SmolLM2 for 20 steps
#    as DDP, FSDP2 (--fsdp) and DeepSpeed ZeRO-2 (--deepspeed), each against one process with
#    the same global batch: the adapters (largest difference) and the evaluation, in
#    train-compare.txt. CPUs cannot run FSDP or DeepSpeed through the Trainer (accelerate
#    enables neither on CPU processes), so these are the commands docs/distributed.md lists
#    as not run here.
set -euo pipefail
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-gpu-results}
ROUNDS=${ROUNDS:-20}
METHODS=${METHODS:-frozen,paca,peft-paca,lora,paca-dropbp,lora-dropbp,frozen-aa}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
    || echo "no nvidia-smi"
  python -c "import torch, platform; print('torch', torch.__version__, '| python', platform.python_version(), '| cuda', torch.version.cuda)"
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

PACA_TEST_DEVICE=$DEVICE python -m pytest -q tests/test_device.py 2>&1 | tee "$OUT/device_tests.txt"
if [ "${SUITE:-1}" = 1 ]; then
  python -m pytest -q -x 2>&1 | tail -3 | tee "$OUT/suite.txt"
fi

for run in default:bfloat16 smollm2:bfloat16 smollm2:float32 overhead:bfloat16; do
  preset=${run%%:*}
  dtype=${run##*:}
  if [ "${QUICK:-0}" = 1 ]; then
    shape=(--quick)
  else
    shape=(--preset "$preset" --rounds "$ROUNDS" --warmup 3)
  fi
  python -m paca.cli bench "${shape[@]}" --device "$DEVICE" --dtype "$dtype" --optim fused \
    --methods "$METHODS" --output "$OUT/bench-$preset-$dtype"
done

python - "$OUT" <<'PY'
import json
import sys
from pathlib import Path

out = Path(sys.argv[1])
lines = [f"# paca bench on {(out / 'machine.txt').read_text().strip()}", ""]
for run in ("default-bfloat16", "smollm2-bfloat16", "smollm2-float32", "overhead-bfloat16"):
    lines += [(out / f"bench-{run}" / "bench.md").read_text(), ""]
(out / "table.md").write_text("\n".join(lines))
print(f"wrote {out / 'table.md'}")
PY

rm -rf "$OUT/default-run"
run_args=()
if [ "${QUICK:-0}" = 1 ]; then
  run_args=(--max-steps 2 --eval-examples 8)
fi
started=$(date +%s)
python -m paca.cli train --device "$DEVICE" "${run_args[@]}" --output "$OUT/default-run"
echo "default paca train: $(($(date +%s) - started)) s wall" | tee "$OUT/default-run.txt"

NGPU=${NGPU:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
if [ "$NGPU" -ge 2 ] && [ "${QUICK:-0}" != 1 ]; then
  common=(train --max-steps 20 --eval-examples 64 --precision bf16)
  python -m paca.cli "${common[@]}" --batch-size $((8 * NGPU)) --output "$OUT/train-1"
  torchrun --standalone --nproc-per-node "$NGPU" -m paca.cli "${common[@]}" --batch-size 8 \
    --output "$OUT/train-ddp"
  torchrun --standalone --nproc-per-node "$NGPU" -m paca.cli "${common[@]}" --batch-size 8 \
    --fsdp --output "$OUT/train-fsdp"
  torchrun --standalone --nproc-per-node "$NGPU" -m paca.cli "${common[@]}" --batch-size 8 \
    --deepspeed examples/deepspeed/zero2.json --output "$OUT/train-zero2"
  python - "$OUT" <<'PY' | tee "$OUT/train-compare.txt"
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

out = Path(sys.argv[1])
one = load_file(out / "train-1" / "adapter" / "adapter.safetensors")
for run in ("ddp", "fsdp", "zero2"):
    folder = out / f"train-{run}"
    got = load_file(folder / "adapter" / "adapter.safetensors")
    gap = max((got[k].float() - one[k].float()).abs().max().item() for k in one)
    metrics = json.loads((folder / "metrics.json").read_text())
    print(run, "largest delta difference", f"{gap:.2e}", "| engine", metrics["engine"],
          "| after", metrics["after"])
PY
fi

