"""One engine switch on or off, in a fresh process per call, from the plan cached in CACHE
(measured here, with the switch as given, when CACHE has none; give each setting of a switch that
changes the plan's candidates its own CACHE). Prints the median, and the largest difference of the
logits from the same plan run eagerly without programmatic dependent launch.

    python3 tools/switch_ab.py MODEL:BATCH CACHE SWITCH=VALUE

    pdl=on|off|default   programmatic dependent launch of our Triton kernels (perf-notes attempt 37)
    ltextra=on|off       the explicit cuBLASLt configurations among the plan's candidates (attempt 38)
    embed=on|off         our Triton patchify and token assembly (plan.embed, attempt 44)
    sustain=on|off       large-batch finalists timed sustained, at the power cap (attempt 45)
    cudaattn=on|off      the CUDA C++ attention kernel among the plan's candidates (attempt 51)
"""
import sys
from dataclasses import replace

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine import compile as cp
from engine.target import detect
from engine.timing import measure
from modeling import cublaslt, cuda_attention, kernels
from modeling.config import vit_config

spec, cache, switch = sys.argv[1:4]
name, batch = spec.split(":")
batch = int(batch)
key, _, value = switch.partition("=")
if key not in ("pdl", "ltextra", "embed", "sustain", "cudaattn"):
    raise SystemExit(f"unknown switch {switch!r}: pdl=on|off|default, ltextra=on|off, embed=on|off, sustain=on|off "
                     "or cudaattn=on|off")
if value not in ("on", "off") + (("default",) if key == "pdl" else ()):
    raise SystemExit(f"{switch}: on or off{' or default' if key == 'pdl' else ''}")
if key == "pdl":
    kernels.FORCE_PDL = {"on": True, "off": False, "default": None}[value]
elif key == "ltextra":
    cublaslt.PLAN_TIMES_EXTRA_CONFIGS = value == "on"
elif key == "sustain":
    cp.PLAN_SUSTAINS = value == "on"
elif key == "cudaattn":
    cuda_attention.PLAN_OFFERS = value == "on"
elif value == "off":  # embed: the measured plan, with torch's patchify and token assembly
    choose_plan = cp.choose_plan

    def torch_embed_plan(*args, **kwargs):
        plan, report = choose_plan(*args, **kwargs)
        return replace(plan, embed="torch"), report
    cp.choose_plan = torch_embed_plan
target = detect("cuda")
cfg = vit_config(name, "ait")
model = wu.seeded_engine(cfg, torch.float16, target.device)
engine = cp.compile_engine(model, batch, target, cp.Options(), cache_root=cache, log=print)
t = measure(engine.run, target.device, warmup_s=0.5, budget_s=4.0)
images = torch.randn(engine.input_shape, device=target.device, dtype=torch.float16)
graphed = engine(images).float()
kernels.FORCE_PDL = False
with torch.no_grad():
    eager = model.set_plan(engine.plan)(images).float()
print(f"{spec} {switch:12s} {t.median_ms:.4f} ms (p10 {t.p10_ms:.4f}, p90 {t.p90_ms:.4f})  "
      f"max |graphed - eager without PDL| {(graphed - eager).abs().max().item():.2e} "
      f"(logits up to {eager.abs().max().item():.1f})  plan {engine.plan}", flush=True)
