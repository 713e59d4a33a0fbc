"""Whole plans timed against each other end to end in one process: each plan's forward captured in
its own graph, timed in alternation for several rounds (engine/compile.py's graph_timer, with
longer rounds), so machine and clock differences between the runs that chose them drop out.

    python3 tools/ab_plans.py MODEL:BATCH[:DTYPE] FILE [FILE ...]   (DTYPE float16, the default, or bfloat16)

A FILE is a results JSON (its row for BATCH gives the plan), a plan cache file (plan.json), or
`compile`: the plan this process chooses now, from an empty plan cache; `attn:TILE`: the plan
before it with its attention swapped for our Triton kernel at TILE (e.g. attn:m64n64w4s3tma).
The all-cuBLAS plan (Triton LayerNorm, GELU in cuBLASLt's epilogue, in-place addmm, cuDNN
attention) runs beside them as the control.
"""
import json
import statistics
import sys
import tempfile

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine.compile import Options, apply_global_options, compile_engine, graph_timer
from engine.target import detect
from modeling import ops
from modeling.config import vit_config
from power_probe import plan_from

spec, files = sys.argv[1], sys.argv[2:]
name, batch, dtype = (spec.split(":") + ["float16"])[:3]
batch, dtype = int(batch), getattr(torch, dtype)
target = detect("cuda")
cfg = vit_config(name, "ait")
model = wu.build_engine(cfg, wu.convert(wu.source_model(cfg, seed=0)[0], cfg), dtype, target.device)
plans = {"cublas": ops.Plan(norm="triton", mlp_act="epilogue", residual="addmm", attention="cudnn")}
plan = None
for path in files:
    if path.startswith("attn:"):
        from dataclasses import replace
        if plan is None:
            sys.exit("error: attn:TILE needs a plan before it (a FILE or compile)")
        plan = replace(plan, attention="triton", attention_tile=path[5:])
    elif path == "compile":
        engine = compile_engine(model, batch, target, Options(), cache_root=tempfile.mkdtemp(), log=print)
        plan = engine.plan
        print(f"{spec} compile: isolated timings (ms) " + json.dumps(
            {site: {k: round(v, 4) for k, v in t.items()} for site, t in engine.info["measured"].items()
             if site in ("mlp_act", "qkv", "proj", "fc2")}) + f"; end to end {engine.info['measured'].get('end_to_end')}")
    else:
        plan = plan_from(path, batch)
    same = [label for label, other in plans.items() if other == plan]
    if same:
        print(f"{spec} {path}: the same plan as {same[0]}")
    else:
        plans[path] = plan
for label, plan in plans.items():
    print(f"{spec} {label}: {json.dumps({k: v for k, v in plan.as_dict().items() if v})}")
apply_global_options(Options(), dtype)
time_plans = graph_timer(model, batch, target, rounds=1, budget_s=1.0)
rounds = [time_plans(plans) for _ in range(5)]  # fresh captures each round
times = {label: statistics.median(r[label] for r in rounds) for label in rounds[0]}
base = times.get("cublas")
for label, ms in sorted(times.items(), key=lambda kv: kv[1]):
    rel = f", {base / ms:.3f}x the all-cuBLAS plan" if base else ""
    print(f"{spec} {label}: median {ms:.3f} ms ({batch / ms * 1e3:,.0f} im/s{rel}); rounds "
          + ", ".join(f"{r[label]:.3f}" for r in rounds))
