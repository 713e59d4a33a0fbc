"""Every GEMM site of a block at a model's real shapes: torch's op (with the LayerNorm or
residual it replaces) against a grid of Triton tile configs; then the whole engine at that
batch with the measured plan and with torch GEMMs only, timed alternately in one process.

    python3 tools/gemm_sites.py MODEL BATCH [BATCH...]
"""
import itertools
import sys
from dataclasses import replace

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine.compile import CompiledEngine, Options, _fastest, compile_engine
from engine.target import detect
from engine.timing import measure
from modeling import kernels, ops
from modeling.config import vit_config

target = detect("cuda")
name, batches = sys.argv[1], [int(b) for b in sys.argv[2:]]
cfg = vit_config(name, "ait")
src, _ = wu.source_model(cfg, seed=0)
model = wu.build_engine(cfg, wu.convert(src, cfg), torch.float16, target.device)
blk = model.blocks[0]
for batch in batches:
    engine = compile_engine(model, batch, target, Options(), cache_root="/tmp/gemm_sites_cache")
    plan = engine.plan
    rows = batch * cfg.seq_len
    x = torch.randn(rows, cfg.embed_dim, device=target.device, dtype=torch.float16)
    a = torch.randn(rows, cfg.num_heads * cfg.head_dim, device=target.device, dtype=torch.float16)
    h = torch.randn(rows, cfg.mlp_hidden, device=target.device, dtype=torch.float16)
    sites = {"qkv": (blk.qkv, x, blk.norm1, None), "proj": (blk.proj, a, None, x),
             "fc1": (blk.fc1, x, blk.norm2, None), "fc2": (blk.fc2, h, None, x)}
    grid = [kernels.GemmConfig(bm, bn, 64, k, 4 if bm * bn <= 64 * 128 else 8, st)
            for bm, bn, k, st in itertools.product((32, 64, 128), (64, 128), (1, 2, 4), (3, 4))
            if rows > 2048 or bm <= 64] if rows <= 8192 else kernels.gemm_candidates(rows, 3072, 768)
    for site, (lin, inp, norm, res) in sites.items():
        cands = {"torch": lambda lin=lin, i=inp, nm=norm, r=res: lin(i, plan, residual=r, norm=nm)}
        for c in grid:
            cands[str(c)] = lambda c=str(c), lin=lin, i=inp, nm=norm, r=res: lin(i, plan, residual=r, norm=nm, impl=c)
        best, times = _fastest(cands, target.device, True)
        top = sorted(times.items(), key=lambda kv: kv[1])[:4]
        print(f"{name} bs{batch} {site}: torch {times['torch'] * 1e3:.1f} us; best "
              + ", ".join(f"{k} {v * 1e3:.1f}" for k, v in top), flush=True)
    # the engine as measured vs the same plan with every GEMM on torch, alternating
    torch_only = replace(plan, **dict.fromkeys(ops.GEMM_SITES, "torch"))
    engines = {"plan": engine}
    if torch_only != plan:
        engines["torch GEMMs"] = CompiledEngine(model.set_plan(torch_only), batch, target, True, torch_only).capture()
    results = {k: [] for k in engines}
    for _ in range(3):
        for label, eng in engines.items():
            results[label].append(measure(eng.run, target.device, warmup_s=0.2, budget_s=0.7).median_ms)
    print(f"{name} bs{batch} engine: " + "; ".join(f"{k} {min(v):.4f} ms" for k, v in results.items())
          + f"  plan {plan.as_dict()}", flush=True)
