#!/usr/bin/env bash
# Data-parallel ViT inference on 1 vs 2 devices at one global batch, as the original example
# measured the MI-250's two GCDs, now under torchrun and the same on NVIDIA, AMD or a CPU:
#   1. compile every batch size on one device (python3 benchmark_ait.py, the default sweep),
#   2. one device at batch N (benchmark_ait.py --batch-size N),
#   3. two devices at N/2 each (torchrun --nproc-per-node 2 benchmark_ait.py --batch-size N),
#   4. print the 1-device vs 2-device table.
#
# Usage: ./benchmark_mi250.sh N        N: the global batch, an even integer >= 2
# Environment:
#   MODEL_NAME   TIMM ViT (default vit_base_patch16_224)
#   DEVICES      the two devices to use (default 0,1): HIP_VISIBLE_DEVICES on ROCm, CUDA_VISIBLE_DEVICES on CUDA
#   OUTPUT_DIR   where the results files go (default .)
#   BENCH_ARGS   extra benchmark_ait.py arguments for every step (e.g. "--time-budget 0.5 --use-graph True")
#   PYTHON       the interpreter (default python3)
#   VIT_SHARE_GPU=1  on a one-GPU machine, run both processes on that GPU: a functional check only
# Without GPUs the same flow runs as CPU processes over gloo (the CI test does, on a tiny ViT).
set -euo pipefail

die() { echo "error: $*" >&2; echo "usage: $0 N   (N: the global batch size, an even integer >= 2; each of 2 devices runs N/2)" >&2; exit 2; }
[ $# -eq 1 ] || die "expected one argument, the global batch size N (got $#)"
[[ "$1" =~ ^[0-9]{1,9}$ ]] || die "N must be a positive integer, got '$1'"
N=$((10#$1))
[ "$N" -ge 2 ] || die "N must be at least 2 (each of the 2 devices runs N/2), got $N"
[ $((N % 2)) -eq 0 ] || die "N must be even: each of the 2 devices runs N/2 (got $N)"

cd "$(dirname "$0")"
export NCCL_NVLS_ENABLE=0   # NVLink multicast stays off on our machines
export PYTHONUNBUFFERED=1
if [ -z "${PYTHON:-}" ] && command -v torchrun > /dev/null; then TORCHRUN=(torchrun); else TORCHRUN=(); fi
PYTHON="${PYTHON:-python3}"
[ ${#TORCHRUN[@]} -gt 0 ] || TORCHRUN=("$PYTHON" -m torch.distributed.run)
MODEL_NAME="${MODEL_NAME:-vit_base_patch16_224}"
OUTPUT_DIR="${OUTPUT_DIR:-.}"
DEVICES="${DEVICES:-0,1}"
read -r -a EXTRA <<< "${BENCH_ARGS:-}"
BENCH=("$PYTHON" benchmark_ait.py --model-name "$MODEL_NAME" --output-dir "$OUTPUT_DIR" ${EXTRA[@]+"${EXTRA[@]}"})

# What this machine has: ROCm (torch.version.hip), CUDA, or neither (DEVICES, not the caller's
# visible-devices variables, picks the devices below).
read -r HIP GPUS < <(env -u CUDA_VISIBLE_DEVICES -u HIP_VISIBLE_DEVICES "$PYTHON" -c "import torch; print(torch.version.hip or '-', torch.cuda.device_count() if torch.cuda.is_available() else 0)") || true
[[ "${GPUS:-}" =~ ^[0-9]+$ ]] || { echo "error: $PYTHON cannot import torch" >&2; exit 2; }
if [ "$GPUS" -eq 0 ]; then
  echo "note: no GPU found; running the same flow as CPU processes (gloo)" >&2
  unset CUDA_VISIBLE_DEVICES HIP_VISIBLE_DEVICES
  ONE=(env) ; TWO=(env)
  FLAG_ONE=-1; FLAG_TWO=-1
else
  if [ "$HIP" != "-" ]; then VAR=HIP_VISIBLE_DEVICES; else VAR=CUDA_VISIBLE_DEVICES; fi
  [[ "$DEVICES" =~ ^[0-9]+,[0-9]+$ ]] || die "DEVICES must name two devices, like 0,1 (got '$DEVICES')"
  FIRST="${DEVICES%%,*}"
  if [ "$GPUS" -lt 2 ] && [ "${VIT_SHARE_GPU:-0}" = 1 ]; then
    # functional check only: two processes share GPU 0 (gloo for the collectives)
    echo "note: VIT_SHARE_GPU=1: both processes share GPU $FIRST; this checks the flow, it does not measure scaling" >&2
    DEVICES="$FIRST"
  else
    [ "$GPUS" -ge 2 ] || { echo "error: 2 GPUs needed, this machine has $GPUS (VIT_SHARE_GPU=1 runs both processes on one, as a functional check)" >&2; exit 2; }
  fi
  ONE=(env "$VAR=$FIRST"); TWO=(env "$VAR=$DEVICES")
  FLAG_ONE="$FIRST"; FLAG_TWO="${DEVICES//,/_}"
  echo "devices: $VAR=$FIRST (1 device), $VAR=$DEVICES (2 devices)" >&2
fi

echo "== 1/3 compile every batch size on one device: benchmark_ait.py (default sweep)" >&2
"${ONE[@]}" "${BENCH[@]}"
echo "== 2/3 one device, batch $N" >&2
"${ONE[@]}" "${BENCH[@]}" --batch-size "$N"
echo "== 3/3 two devices, batch $((N / 2)) each (global batch $N)" >&2
"${TWO[@]}" "${TORCHRUN[@]}" --standalone --nproc-per-node 2 "${BENCH[@]:1}" --batch-size "$N"

echo
stem="${OUTPUT_DIR}/${MODEL_NAME}_ait_benchmark_dev"
"$PYTHON" -m engine.device_table --batch-size "$N" --mode ait --devices 1,2 \
  "${stem}_${FLAG_ONE}.json" "${stem}_${FLAG_TWO}.json"
