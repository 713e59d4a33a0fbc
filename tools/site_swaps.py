"""Does a GEMM site's choice, timed alone, hold inside the whole forward? The plan is measured
(from an empty plan cache), then each site's candidates within CLOSE of its best isolated time are
swapped into the plan one at a time, and every such plan is timed end to end in its own graph, in
alternation for ROUNDS rounds (engine/compile.py's graph_timer). Prints, per site, each candidate's
isolated time and its whole-forward time against the measured plan's.

    python3 tools/site_swaps.py MODEL:BATCH [CLOSE=0.06] [ROUNDS=5]
"""
import statistics
import sys
import tempfile

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine import compile as cp
from engine.target import detect
from modeling.config import vit_config

spec = sys.argv[1]
close = float(sys.argv[2]) if len(sys.argv) > 2 else 0.06
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 5
name, batch = spec.split(":")
batch = int(batch)
target = detect("cuda")
model = wu.seeded_engine(vit_config(name, "ait"), torch.float16, target.device)
with tempfile.TemporaryDirectory() as cache:
    engine = cp.compile_engine(model, batch, target, cp.Options(), cache_root=cache, log=print)
plan, report = engine.plan, engine.info["measured"]
del engine
print(f"{spec}: measured plan {plan}", flush=True)

plans, alone = {"chosen": plan}, {}
for site in ("mlp_act", "qkv", "proj", "fc2", "attention"):
    times = report.get(site) or {}
    best = min(times.values(), default=0.0)
    for candidate, ms in sorted(times.items(), key=lambda item: item[1]):
        swapped = cp.with_choice(plan, site, candidate)
        if ms <= best * (1 + close) and swapped != plan:
            plans[f"{site}={candidate}"] = swapped
            alone[f"{site}={candidate}"] = (ms, best)
print(f"{len(plans) - 1} swaps within {close:.0%} of each site's best alone; {rounds} rounds", flush=True)

# several short timer calls, each alternating all plans, so drift lands on every plan alike
samples = {label: [] for label in plans}
timer = cp.graph_timer(model, batch, target, rounds=1, budget_s=0.05)
for _ in range(rounds):
    for label, ms in timer(plans).items():
        samples[label].append(ms)
chosen = statistics.median(samples["chosen"])
print(f"{'swap':44s} {'alone ms':>9s} {'vs best':>8s} {'forward ms':>11s} {'vs plan':>8s}  spread")
for label in sorted(plans, key=lambda k: (k.split("=")[0], statistics.median(samples[k]) if samples[k] else 1e9)):
    if not samples[label]:
        print(f"{label:44s} failed to run")
        continue
    ms = statistics.median(samples[label])
    ms_alone, best = alone.get(label, (float("nan"), float("nan")))
    print(f"{label:44s} {ms_alone:9.4f} {ms_alone / best:8.3f} {ms:11.3f} {ms / chosen:8.3f}  "
          f"{min(samples[label]):.3f}-{max(samples[label]):.3f}", flush=True)
