"""The engine at a batch size with its measured plan against the same plan with one choice
flipped (programmatic launch, the split-K Triton residual GEMMs), timed alternately in one process.

    python3 tools/gemm_sites.py MODEL BATCH [BATCH...]
"""
import sys
from dataclasses import replace

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine.compile import CompiledEngine, Options, compile_engine
from engine.target import detect
from engine.timing import measure
from modeling import ops
from modeling.config import vit_config

target = detect("cuda")
name, batches = sys.argv[1], [int(b) for b in sys.argv[2:]]
cfg = vit_config(name, "ait")
src, _ = wu.source_model(cfg, seed=0)
model = wu.build_engine(cfg, wu.convert(src, cfg), torch.float16, target.device)
for batch in batches:
    engine = compile_engine(model, batch, target, Options(), cache_root="/tmp/gemm_sites_cache")
    plan = engine.plan
    print(f"{name} bs{batch} plan {plan.as_dict()} (compile {engine.info['compile_s']} s)")
    for site, times in engine.info.get("measured", {}).items():
        print(f"  {site}: " + ", ".join(f"{k} {v * 1e3:.1f} us" for k, v in sorted(times.items(), key=lambda kv: kv[1])))
    variants = {"plan": plan, "pdl flipped": replace(plan, pdl=not plan.pdl),
                "torch residual GEMMs": replace(plan, **dict.fromkeys(ops.GEMM_SITES, "torch"))}
    engines = {}
    for label, p in variants.items():
        if p == plan and label != "plan":
            continue
        engines[label] = engine if label == "plan" else CompiledEngine(model.set_plan(p), batch, target, True, p).capture()
    results = {k: [] for k in engines}
    for _ in range(3):
        for label, eng in engines.items():
            results[label].append(measure(eng.run, target.device, warmup_s=0.2, budget_s=0.7).median_ms)
    print(f"{name} bs{batch}: " + "; ".join(f"{k} {min(v):.4f} ms" for k, v in results.items()), flush=True)
