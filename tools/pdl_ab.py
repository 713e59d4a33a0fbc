"""Latency with and without programmatic dependent launch (modeling/kernels.py, perf-notes
attempt 37), in a fresh process per call, from the plan cached in CACHE (measured here, with
the default, when CACHE has none). Prints the median, and the largest difference of the
logits from the same plan run eagerly without it.

    python3 tools/pdl_ab.py MODEL:BATCH CACHE on|off|default
"""
import sys

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine import compile as cp
from engine.target import detect
from engine.timing import measure
from modeling import kernels
from modeling.config import vit_config

spec, cache, level = sys.argv[1:4]
name, batch = spec.split(":")
batch = int(batch)
target = detect("cuda")
cfg = vit_config(name, "ait")
model = wu.seeded_engine(cfg, torch.float16, target.device)
kernels.FORCE_PDL = {"on": True, "off": False, "default": None}[level]
engine = cp.compile_engine(model, batch, target, cp.Options(), cache_root=cache, log=print)
t = measure(engine.run, target.device, warmup_s=0.5, budget_s=4.0)
images = torch.randn(engine.input_shape, device=target.device, dtype=torch.float16)
graphed = engine(images).float()
kernels.FORCE_PDL = False
with torch.no_grad():
    eager = model.set_plan(engine.plan)(images).float()
print(f"{spec} level {level:7s} {t.median_ms:.4f} ms (p10 {t.p10_ms:.4f}, p90 {t.p90_ms:.4f})  "
      f"max |graphed - eager without| {(graphed - eager).abs().max().item():.2e} "
      f"(logits up to {eager.abs().max().item():.1f})", flush=True)
