"""Why do the tools (ab_tiles, determinism) time the same engine slower than the sweep? Compiles
one engine per spec from an empty plan cache, then times it right away, after the sweep's
clean-up (gc, empty_cache), and after idle pauses, with the GPU's clock and temperature beside.

    python3 tools/timing_probe.py MODEL:BATCH[:DTYPE] [...]
"""
import gc
import subprocess
import sys
import tempfile
import time

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine.compile import Options, compile_engine
from engine.target import detect
from engine.timing import measure
from modeling.config import vit_config

target = detect("cuda")


def gpu_state():
    q = "clocks.sm,clocks.mem,temperature.gpu,power.draw,clocks_throttle_reasons.active"
    return subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                          text=True).stdout.strip()


for spec in sys.argv[1:]:
    name, batch, *dt = spec.split(":")
    dtype = getattr(torch, dt[0]) if dt else torch.float16
    cfg = vit_config(name, "ait")
    model = wu.seeded_engine(cfg, dtype, target.device)
    engine = compile_engine(model, int(batch), target, Options(), cache_root=tempfile.mkdtemp(), log=print)
    print(f"{spec}: plan {engine.plan}")
    steps = [("right after compile", lambda: None),
             ("after gc + empty_cache", lambda: (torch.cuda.synchronize(), gc.collect(), torch.cuda.empty_cache())),
             ("after 10 s idle", lambda: time.sleep(10)),
             ("again", lambda: None),
             ("after 30 s idle", lambda: time.sleep(30))]
    for label, before in steps:
        before()
        state = gpu_state()
        t = measure(engine.run, target.device, warmup_s=0.5, budget_s=2.0)
        print(f"{spec} {label}: {t}  [gpu before: {state}] [after: {gpu_state()}]")
        sys.stdout.flush()
    del engine, model
    gc.collect()
    torch.cuda.empty_cache()
