#!/usr/bin/env bash
# One device call: environment, GPU self-checks, verification, engine sweep, baselines, profiles.
# Usage: tools/gpu_session.sh STEP...   (steps: env selftest verify bench_b bench_l pt profile clocks picks cold ab tiles power
#                                        attention beside fold)
# cold times MODEL:BATCH[:DTYPE] specs from COLD_SIZES (default: both models at batch 1 and 256).
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
OUT="${OUT:-out}"; mkdir -p "$OUT"
log() { echo "=== $*"; }
for step in "$@"; do
  case "$step" in
    env) log env; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
         python3 -c "import torch, timm, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'timm', timm.__version__, 'triton', triton.__version__)";;
    selftest) log selftest; python3 tools/gpu_selftest.py;;
    verify) log verify
      for m in vit_base_patch16_224 vit_large_patch16_384; do for dt in float16 bfloat16; do
        python3 verification.py --model-name $m --variant ait --dtype $dt --batch-size 8 2>&1 | grep -v '^note' ; done; done;;
    bench_b) log bench_b; python3 benchmark_ait.py --model-name vit_base_patch16_224 --output-dir "$OUT" 2>&1 | grep -E "ait ait batch|error";;
    bench_l) log bench_l; python3 benchmark_ait.py --model-name vit_large_patch16_384 --output-dir "$OUT" 2>&1 | grep -E "ait ait batch|error";;
    pt) log pt
      for m in vit_base_patch16_224 vit_large_patch16_384; do for b in 1 256; do
        python3 benchmark_pt.py --model-name $m --batch-size $b --output-dir "$OUT" 2>&1 | grep -E "batch|error"; done; done;;
    profile) log profile
      for m in vit_base_patch16_224 vit_large_patch16_384; do for b in 1 256; do
        python3 tools/profile_engine.py $m ait $b 2>&1 | grep -v Warn; done; done;;
    ab) log "ab: tools/switch_ab.py ${AB_SWITCH:-ltextra} off/on alternating at ${AB_SIZES:-vit_base_patch16_224:256}, one plan cache per setting"
      for spec in ${AB_SIZES:-vit_base_patch16_224:256}; do for v in off on off on; do
        timeout 200 python3 tools/switch_ab.py "$spec" "$OUT/ab/${AB_SWITCH:-ltextra}/${spec#*:}/$v" "${AB_SWITCH:-ltextra}=$v" 2>&1 | grep -E "=$v|rror"; done; done;;
    tiles) log "tiles: attention at ${TILE_SIZES:-vit_base_patch16_224:16 vit_base_patch16_224:64 vit_base_patch16_224:256}"
      python3 tools/attention_tiles.py ${TILE_SIZES:-vit_base_patch16_224:16 vit_base_patch16_224:64 vit_base_patch16_224:256};;
    power) log "power: sustained power, clocks and energy (tools/power_probe.py)"
      python3 tools/power_probe.py forward ${POWER_SIZES:-vit_base_patch16_224:256 vit_base_patch16_224:256:bfloat16}
      python3 tools/power_probe.py sites ${POWER_SITES:-vit_base_patch16_224:256};;
    clocks) log clocks; python3 tools/graph_vs_eager.py vit_base_patch16_224 256;;
    fold) log "fold: our GEMM's variants checked and timed beside cuBLAS, then LayerNorm folded into qkv/fc1 by its best in whole forwards"
      timeout -s KILL 200 python3 tools/wgmma_gemm.py ${FOLD_SIZE:-vit_base_patch16_224:256} > "$OUT/wgmma-gemm.log" 2>&1
      echo "wgmma_gemm exit $?"; grep -v " ok$" "$OUT/wgmma-gemm.log" | tail -60
      best=$(grep '^best variant' "$OUT/wgmma-gemm.log" | awk '{print $3}')
      WGMMA_VARIANT=${best:-coop:2} timeout -s KILL 200 python3 tools/fold_whatif.py ${FOLD_SIZE:-vit_base_patch16_224:256} 3 \
        > "$OUT/fold-whatif.log" 2>&1
      echo "fold_whatif exit $?"; grep -v "^  round\|Warn" "$OUT/fold-whatif.log" | tail -25;;
    attention) log "attention: the CUDA kernel's numbers, registers and times beside cuDNN and Triton, then its parts alone"
      python3 tools/cuda_attention_check.py ${ATTN_BATCHES:-16 32 64 128 256}
      python3 tools/attention_probe.py 64 256 w2s2 w2s2p;;
    beside) log "beside: the engine, max-autotune, torch.compile, eager and the engine again at ${BESIDE_SIZES:-vit_base_patch16_224:256}"
      for spec in ${BESIDE_SIZES:-vit_base_patch16_224:256}; do
        m=${spec%%:*}; b=${spec#*:}; dir="$OUT/beside/${m}_bs$b"
        python3 benchmark_ait.py --model-name "$m" --batch-size "$b" --output-dir "$dir" 2>&1 | grep -E "ait ait batch|rror"
        for mode in max-autotune compile eager; do
          python3 benchmark_pt.py --model-name "$m" --batch-size "$b" --mode "$mode" --output-dir "$dir" 2>&1 | grep -E "batch $b|rror"
        done
        python3 benchmark_ait.py --model-name "$m" --batch-size "$b" --output-dir "$dir" 2>&1 | grep -E "ait ait batch|rror"
      done;;
    picks) log "picks: ${PICK_RUNS:-5} processes per spec in ${PICK_SIZES:-vit_base_patch16_224:2:float16 vit_base_patch16_224:2:bfloat16}, each planning into its own cache, then one loading it"
      for spec in ${PICK_SIZES:-vit_base_patch16_224:2:float16 vit_base_patch16_224:2:bfloat16}; do
        IFS=: read -r m b dt <<< "$spec"; dt=${dt:-float16}
        for i in $(seq "${PICK_RUNS:-5}"); do
          for pass in plan load; do
            python3 benchmark_ait.py --model-name "$m" --batch-size "$b" --dtype "$dt" --cache-dir "$OUT/picks/c$i" \
              --output-dir "$OUT/picks/r" 2>&1 | grep -E "ait ait batch|rror" | sed "s/^/$dt $i $pass: /"
          done
          python3 -c "import json,sys; e=json.load(open(sys.argv[1])); t=e['measured'].get('end_to_end') or {0: 0}; print(' plan', {k: v for k, v in e['plan'].items() if v}, 'check_s', e['measured']['phases_s'].get('end_to_end'), 'timed', len(t), 'fastest whole forward timed %.4f' % min(t.values()))" \
            "$OUT/picks/c$i/${m}_ait_bs${b}_${dt}/plan.json"
        done
      done;;
    cold) log "cold: one batch size compiled from an empty Triton cache and plan cache, each"
      for spec in ${COLD_SIZES:-vit_base_patch16_224:1 vit_large_patch16_384:1 vit_base_patch16_224:256 vit_large_patch16_384:256}; do
        IFS=: read -r m b dt <<< "$spec"; dt=${dt:-float16}  # MODEL:BATCH[:DTYPE]
        echo "--- $m batch $b $dt"
        plans="$OUT/cold/plans/${m}_bs${b}_${dt}_$RANDOM"
        TRITON_CACHE_DIR=$(mktemp -d) python3 benchmark_ait.py --model-name "$m" --batch-size "$b" --dtype "$dt" \
          --cache-dir "$plans" --output-dir "$OUT/cold/$dt" 2>&1 | grep -E "ait ait batch|rror"
        python3 -c "import json,sys; r=[r for r in json.load(open(sys.argv[1]))['rows'] if r['batch_size']==$b][-1]; print(' compile_s', r.get('compile_s'), 'plan_s', r.get('plan_s'), 'plan', r.get('plan'))" \
          "$OUT/cold/$dt/${m}_ait_benchmark_dev_-1.json"
        python3 -c "import json,sys,glob; [print(' end_to_end', m.get('end_to_end'), 'phases_s', m.get('phases_s')) for m in (json.load(open(f))['measured'] for f in glob.glob(sys.argv[1] + '/*/plan.json'))]" "$plans"
      done;;
  esac
done
