"""Why an engine whose plan was measured in the same process runs slower at small batch than the
same plan loaded from the cache in a fresh process (perf-notes attempt 36). Each call is one
fresh process: do part of the plan's measuring (PART), then build the engine from the cached
plan in CACHE and time it.

    python3 tools/plan_state.py MODEL:BATCH CACHE PART
    PART: none | full | precompile | norm | attention | gemm | refine   (parts of choose_plan)
          | alloc | triton | graph | cublas                               (single suspects)
"""
import sys
import tempfile

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine import compile as cp
from engine.target import detect
from engine.timing import measure
from modeling import ops
from modeling.config import vit_config

spec, cache, part = sys.argv[1:4]
name, batch = spec.split(":")
batch = int(batch)
target = detect("cuda")
cfg = vit_config(name, "ait")
model = wu.build_engine(cfg, wu.convert(wu.source_model(cfg, seed=0)[0], cfg), torch.float16, target.device)
SITE_OF = {"torch": "norm", "cudnn": "attention", "math": "attention", "cublas": "gemm", "separate": "gemm",
           "add": "gemm"}

real_fastest, real_precompile = cp._fastest, cp._precompile


def fastest(candidates, *args, **kwargs):
    site = next((SITE_OF[k] for k in candidates if k in SITE_OF), "?")
    if part in ("full", site):
        return real_fastest(candidates, *args, **kwargs)
    first = next(iter(candidates))
    return first, {first: 1.0}


cp._fastest = fastest
cp._precompile = lambda launches, threads=8: real_precompile(launches, threads) if part in (
    "full", "precompile") else None
if part == "alloc":  # choose_plan's input tensors, allocated and freed
    gen = torch.Generator(device=target.device).manual_seed(0)
    rows = batch * cfg.seq_len
    tensors = [torch.randn(rows, n, device=target.device, dtype=torch.float16, generator=gen)
               for n in (cfg.embed_dim, cfg.embed_dim, cfg.mlp_hidden, 3 * cfg.embed_dim)]
    del tensors
elif part == "triton":  # one Triton kernel launched eagerly
    x = torch.randn(4, cfg.embed_dim, device=target.device, dtype=torch.float16)
    w = torch.ones(cfg.embed_dim, device=target.device)
    ops.layer_norm(x, w, w, 1e-6, None, "triton")
    torch.cuda.synchronize()
elif part == "graph":  # one small graph captured and replayed
    x = torch.ones(16, device=target.device)
    cp.capture_graph(lambda: x + 1)[0].replay()
    torch.cuda.synchronize()
elif part == "cublas":  # one cuBLAS GEMM, eagerly
    x = torch.ones(16, 16, device=target.device, dtype=torch.float16)
    (x @ x).sum().item()
elif part != "none":
    cp.apply_global_options(cp.Options(), torch.float16)
    plan, report = cp.choose_plan(model.set_plan(ops.Plan()), batch, target, cp.Options())
    if part == "full":
        cp.refine_plan(plan, report, cp.graph_timer(model, batch, target))
    if part == "refine":  # whole forwards captured and timed, as the end-to-end check does
        cp.graph_timer(model, batch, target)({"a": ops.Plan(norm="triton", residual="addmm", mlp_act="epilogue"),
                                              "b": ops.Plan(norm="triton", residual="addmm")})
engine = cp.compile_engine(model, batch, target, cp.Options(), cache_root=cache, log=print)
t = measure(engine.run, target.device, warmup_s=0.3, budget_s=1.0)
print(f"{part:12s} {engine.info['plan_source'][:8]} {t.median_ms:.4f} ms (p10 {t.p10_ms:.4f})", flush=True)
