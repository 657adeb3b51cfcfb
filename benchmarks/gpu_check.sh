#!/usr/bin/env bash
# The device checks for a machine with NVIDIA GPUs, as one command, most
# important first, within a time budget (default 480 s: about 8 minutes on
# one H200):
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR] [FASHION_MNIST_DIR]
#
# 1. Throughput of every depth of ResNet-122-i at the paper's sizes (5-5-5 ->
#    10-10-10 -> 20-20-20 blocks, 32x32x3 images, batch 100) in both block
#    layouts (unrolled and scanned: compile and step time), on 1 device and,
#    with several GPUs, on all of them side by side.
# 2. A short Table-3 study on Fashion-MNIST (first-cycle, last-cycle and
#    multi-level model of the CPU preset, 3 epochs instead of 6, seed 0), if the data
#    is there (default /usr/share/datasets/fashion-mnist; copy the four IDX
#    .gz files to the machine and pass their folder otherwise).
# 3. The same throughput for WResNet-122-i.
# 4. ResNet-122-i, then WResNet-122-i, in bfloat16 (float32 parameters).
#
# Each part gets what is left of the budget and is cut short (and said so)
# when it would run past it; a part that fails is named at the end and makes
# the exit status 1. Needs `pip install -e '.[cuda12]'`. Writes
# OUTPUT_DIR (default runs/gpu_check)/{resnet,wresnet,resnet_bf16,
# wresnet_bf16}/throughput.{md,json} and OUTPUT_DIR/study/study.{md,json,png}.
#
# Environment (tests/test_benchmarks.py runs the whole script on a CPU with
# tiny sizes through these): PYTHON (default python), BUDGET_SECONDS,
# THROUGHPUT_FLAGS and STUDY_FLAGS (appended to each throughput and study
# command: later flags win).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
DATA=${2:-/usr/share/datasets/fashion-mnist}
PYTHON=${PYTHON:-python}
BUDGET_SECONDS=${BUDGET_SECONDS:-480}
read -r -a THROUGHPUT_EXTRA <<< "${THROUGHPUT_FLAGS:-}"
read -r -a STUDY_EXTRA <<< "${STUDY_FLAGS:-}"
FAILED=()

# part NAME COMMAND...: runs COMMAND within what is left of the budget.
part() {
  local name=$1 left=$((BUDGET_SECONDS - SECONDS)) status=0
  shift
  if [ "$left" -lt 10 ]; then
    echo "== $name: skipped, the budget of ${BUDGET_SECONDS} s is spent" >&2
    return
  fi
  echo "== $name (at ${SECONDS} s, ${left} s left)"
  timeout --signal=INT --kill-after=20 "$left" "$@" || status=$?
  if [ "$status" -eq 124 ] || [ "$status" -eq 130 ] || [ "$status" -eq 137 ]; then
    echo "== $name: cut short at the end of the budget" >&2
  elif [ "$status" -ne 0 ]; then
    echo "== $name: failed (exit status $status)" >&2
    FAILED+=("$name")
  fi
}

DEVICES=$("$PYTHON" -c "import jax; print(jax.device_count())") || exit 1
"$PYTHON" -c "import jax; print(jax.devices())"
COUNTS=1
if [ "$DEVICES" -gt 1 ]; then COUNTS="1,$DEVICES"; fi

throughput() {  # throughput FAMILY DTYPE FOLDER
  part "throughput $1 $2" "$PYTHON" -m benchmarks.throughput --dataset=cifar10 \
    --families="$1" --stage_sizes=5,5,5 --levels=3 --cycle_epochs=60,50,50 --steps=20 \
    --warmup=5 --layouts=unrolled,scanned --compute_dtype="$2" --device_counts="$COUNTS" \
    --output_dir="$OUT/$3" "${THROUGHPUT_EXTRA[@]}"
}

throughput resnet float32 resnet
if [ -f "$DATA/train-images-idx3-ubyte.gz" ]; then
  part "study" "$PYTHON" -m benchmarks.study --config=benchmarks/presets/cpu.py \
    --config.fashion_mnist_dir="$DATA" --config.num_epochs=3.0 \
    '--config.cycle_boundaries=(1.125,2.0625)' --models=first_cycle,last_cycle,multilevel/paper \
    --seeds=0 --output_dir="$OUT/study" "${STUDY_EXTRA[@]}"
else
  echo "== study: skipped, no Fashion-MNIST in $DATA" >&2
fi
throughput wresnet float32 wresnet
throughput resnet bfloat16 resnet_bf16
throughput wresnet bfloat16 wresnet_bf16

echo "== done in ${SECONDS} s; results in $OUT"
if [ "${#FAILED[@]}" -gt 0 ]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
