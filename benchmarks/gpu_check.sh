#!/usr/bin/env bash
# The device checks for a machine with NVIDIA GPUs, as one command:
#
#   bash benchmarks/gpu_check.sh [OUTPUT_DIR] [FASHION_MNIST_DIR]
#
# 1. Throughput of every depth of ResNet-122-i and WResNet-122-i at the paper's
#    sizes (5-5-5 -> 10-10-10 -> 20-20-20 blocks, 32x32x3 images, batch 100),
#    in both block layouts (unrolled and scanned: compile and step time), on 1
#    device and, with several GPUs, on all of them side by side; then the same
#    in bfloat16 (float32 parameters).
# 2. A short Table-3 comparison on Fashion-MNIST (first-cycle, last-cycle and
#    multi-level model of the CPU preset, 3 epochs instead of 6), if the data
#    is there (default /usr/share/datasets/fashion-mnist; copy the four IDX
#    .gz files to the machine and pass their folder otherwise).
#
# Needs `pip install -e '.[cuda12]'`. Writes OUTPUT_DIR (default
# runs/gpu_check)/throughput/{throughput.md,throughput.json},
# OUTPUT_DIR/throughput_bf16/{...} and
# OUTPUT_DIR/compare/{compare.md,compare.json,compare_curves.png}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
DATA=${2:-/usr/share/datasets/fashion-mnist}
PYTHON=${PYTHON:-python}
DEVICES=$("$PYTHON" -c "import jax; print(jax.device_count())")
COUNTS=1
if [ "$DEVICES" -gt 1 ]; then COUNTS="1,$DEVICES"; fi
echo "$("$PYTHON" -c "import jax; print(jax.devices())")"
for DTYPE in float32 bfloat16; do
  SUFFIX=$([ "$DTYPE" = float32 ] && echo "" || echo "_bf16")
  "$PYTHON" -m benchmarks.throughput --dataset=cifar10 --families=resnet,wresnet \
      --stage_sizes=5,5,5 --levels=3 --cycle_epochs=60,50,50 --steps=20 --warmup=5 \
      --layouts=unrolled,scanned --compute_dtype="$DTYPE" --device_counts="$COUNTS" \
      --output_dir="$OUT/throughput$SUFFIX"
done
if [ -f "$DATA/train-images-idx3-ubyte.gz" ]; then
  "$PYTHON" -m benchmarks.compare --config=benchmarks/presets/cpu.py \
      --config.fashion_mnist_dir="$DATA" --config.num_epochs=3.0 \
      '--config.cycle_boundaries=(1.125,2.0625)' --output_dir="$OUT/compare"
else
  echo "No Fashion-MNIST in $DATA: skipped the comparison." >&2
fi
