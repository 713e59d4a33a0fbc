#!/usr/bin/env bash
# The whole comparison on one GPU in one run: verification (float16 and bfloat16, every batch
# size), the fused engine's sweep, PyTorch eager's sweep, and torch.compile at chosen sizes,
# all with the same harness, then the report.
#
#   ./benchmark_compare.sh [MODEL...]        (default: vit_base_patch16_224 vit_large_patch16_384)
#
# Environment: OUT_DIR (default results), STEPS (default "verify ait ait_bf16 pt compile autotune report";
# report also copies the plans the sweep ran, with their timings, to OUT_DIR/plans/),
# COMPILE_SIZES / AUTOTUNE_SIZES (torch.compile takes 20 s to minutes per size, so a subset).
set -euo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
OUT_DIR="${OUT_DIR:-results}"
STEPS="${STEPS:-verify ait ait_bf16 pt compile autotune report}"
COMPILE_SIZES="${COMPILE_SIZES:-1 16 256}"
AUTOTUNE_SIZES="${AUTOTUNE_SIZES:-1 256}"
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=(vit_base_patch16_224 vit_large_patch16_384)
mkdir -p "$OUT_DIR"
for model in "${MODELS[@]}"; do
  for step in $STEPS; do
    echo "=== $model: $step"
    case "$step" in
      verify) for dt in float16 bfloat16; do
                python3 verification.py --model-name "$model" --variant ait --dtype "$dt" --batch-size 0
              done ;;
      ait) python3 benchmark_ait.py --model-name "$model" --output-dir "$OUT_DIR" ;;
      ait_bf16) python3 benchmark_ait.py --model-name "$model" --dtype bfloat16 --output-dir "$OUT_DIR/bfloat16" ;;
      pt) python3 benchmark_pt.py --model-name "$model" --output-dir "$OUT_DIR" ;;
      compile) for n in $COMPILE_SIZES; do
                 python3 benchmark_pt.py --model-name "$model" --mode compile --batch-size "$n" --output-dir "$OUT_DIR"
               done ;;
      autotune) for n in $AUTOTUNE_SIZES; do
                  python3 benchmark_pt.py --model-name "$model" --mode max-autotune --batch-size "$n" --output-dir "$OUT_DIR"
                done ;;
      report) if [ -f report.py ]; then python3 report.py --model-name "$model" --results-dir "$OUT_DIR"; fi
              # the plans the sweep ran, each with its sites' isolated timings and end-to-end check
              mkdir -p "$OUT_DIR/plans"
              for plan in tmp/"${model}"_*/plan.json; do
                if [ -f "$plan" ]; then cp "$plan" "$OUT_DIR/plans/$(basename "$(dirname "$plan")").json"; fi
              done ;;
      *) echo "unknown step $step" >&2; exit 2 ;;
    esac
  done
done
