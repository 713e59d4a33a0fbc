#!/usr/bin/env bash
# Peak memory of the engine beside eager at small batches, under the default caching allocator and
# with expandable segments (CONFS), each in its own process. Usage: tools/memory_check.sh MODEL BATCH...
set -u
model=$1; shift
OUT="${OUT:-out}"
for conf in ${CONFS:-default expandable_segments:True}; do
  for b in "$@"; do
    for script in benchmark_ait.py benchmark_pt.py; do
      dir="$OUT/mem/$conf/$b"; mkdir -p "$dir"
      if [ "$conf" = default ]; then env -u PYTORCH_CUDA_ALLOC_CONF python3 $script --model-name $model --batch-size $b --output-dir "$dir" --time-budget 0.5 >/dev/null 2>&1
      else PYTORCH_CUDA_ALLOC_CONF=$conf python3 $script --model-name $model --batch-size $b --output-dir "$dir" --time-budget 0.5 >/dev/null 2>&1; fi
    done
  done
done
python3 - "$OUT/mem" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("*/*/*.json"), key=lambda f: (f.parent.parent.name, int(f.parent.name), f.name)):
    for r in json.loads(f.read_text())["rows"]:
        print(f.parent.parent.name, r["batch_size"], r["engine"], "reserved", r.get("peak_mem_mb"), "alloc", r.get("peak_alloc_mb"), "ms", r.get("latency_ms"))
PY
