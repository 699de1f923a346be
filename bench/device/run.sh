#!/usr/bin/env bash
# The GPU check of `rayseg train --use-gpu` under Ray Train, as ONE command on the device machine.
#
#   device run:  carry ["bench/device/_bundle"], command: bash bench/device/run.sh, timeout_s 580
#   CPU smoke:   SMOKE=1 bash bench/device/run.sh      (here: tiny data, CPU, checks the script)
#
# Unpacks the bundle (bundle.sh) to /tmp/site, puts it and the repo on PYTHONPATH, then:
#   1. rayseg synth: 800 COCO-sized 640x480 JPEGs -> rayseg masks --images-dir -> Parquet
#   2. bench/gpu_bench.py: the plain PyTorch step (the bar), same model, crop and batch
#   3. rayseg train --use-gpu, deeplabv3_resnet50, crop 480, batch 16: bf16 + channels_last, then
#      the same with --compile, each in its own run dir (metrics.jsonl has images/s and data wait)
#   4. rerun of (3) with one more epoch: resumes from its checkpoint
#   5. rayseg evaluate / rayseg predict --use-gpu on the trained run
#   6. bench/device/collect.py -> $OUT/gpu_train_<gpu>.json (plain vs rayseg per mode)
# Each step has its own time limit and failures are recorded, not fatal: one run says all it can.
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
OUT=${OUT:-/tmp/rayseg-device-out}
mkdir -p "$OUT"
LOG="$OUT/run.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0

if [[ "${SMOKE:-0}" == 1 ]]; then
  PY=${PY:-$REPO/.venv/bin/python}
  N=48; W=160; H=120; MODEL=lraspp_mobilenet_v3_large; CROP=96; BATCH=4; EPOCHS=1
  GPU_FLAG=--no-use-gpu; BENCH_ARGS=(--cpu-smoke --modes fp32); LIMIT=600; BUDGET=${BUDGET:-1500}
else
  PY=python3
  SITE=/tmp/site
  mkdir -p "$SITE"
  xz -dc bench/device/_bundle/ray-site.tar.xz | tar -C "$SITE" -xf - || exit 1
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    bench/device/_bundle/wheels/*.whl || exit 1
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  export PATH="$SITE/bin:$PATH"
  N=800; W=640; H=480; MODEL=deeplabv3_resnet50; CROP=480; BATCH=16; EPOCHS=2
  GPU_FLAG=--use-gpu; BENCH_ARGS=(--modes bf16_cl,bf16_cl_compile --total-timeout 140); LIMIT=150
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
RAYSEG=("$PY" -m rayseg)
DATA=/tmp/rayseg-device
rm -rf "$DATA" && mkdir -p "$DATA"

# One device call may run 10 minutes: every step is capped by what is left of BUDGET seconds.
BUDGET=${BUDGET:-540}
step() {  # step NAME SECONDS CMD...: run with a limit, record rc and seconds in $OUT/steps.jsonl
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((BUDGET - SECONDS))
  if (( left < 20 )); then
    echo "{\"step\": \"$name\", \"rc\": null, \"skipped\": \"time budget spent\"}" >> "$OUT/steps.jsonl"
    return 1
  fi
  (( limit > left )) && limit=$left
  echo "=== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@"
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >> "$OUT/steps.jsonl"
  echo "=== $name: rc=$rc in $((SECONDS - t0))s"
  return $rc
}

"$PY" -c "import ray, torch, torchvision, rayseg; print('ray', ray.__version__, 'torch', \
torch.__version__, 'cuda', torch.cuda.is_available())" | tee "$OUT/env.txt" || exit 1
step synth 120 "${RAYSEG[@]}" synth --out "$DATA/synth" --num-images $N --width $W --height $H
step masks 120 "${RAYSEG[@]}" masks --annotations "$DATA/synth/annotations.json" \
  --images-dir "$DATA/synth/images" --out "$DATA/masks"
step plain_step 150 "$PY" bench/gpu_bench.py "${BENCH_ARGS[@]}" --batch-size $BATCH --crop $CROP
cp -f "$OUT/gpu_bench.json" "$OUT/plain.json" 2>/dev/null || true
TRAIN=("${RAYSEG[@]}" train --data "$DATA/masks" --model $MODEL --crop-size $CROP
  --batch-size $BATCH --epochs $EPOCHS $GPU_FLAG --val-fraction 0.05)
step train_bf16 $LIMIT "${TRAIN[@]}" --out "$DATA/run_bf16"
step train_compile $LIMIT "${TRAIN[@]}" --out "$DATA/run_compile" --compile
step resume 120 "${TRAIN[@]}" --out "$DATA/run_bf16" --epochs $((EPOCHS + 1))
step evaluate 90 "${RAYSEG[@]}" evaluate --checkpoint "$DATA/run_bf16" --data "$DATA/masks" \
  --out "$DATA/eval" $GPU_FLAG
step predict 90 "${RAYSEG[@]}" predict --checkpoint "$DATA/run_bf16" --images "$DATA/synth/images" \
  --out "$DATA/pred" $GPU_FLAG
"$PY" bench/device/collect.py --data "$DATA" --out "$OUT" --steps "$OUT/steps.jsonl"
