"""Why does the graph replay take longer than the sum of its kernels? Time the same engine
eagerly and as a graph, back to back, reading the SM clock while each runs."""
import subprocess
import sys
import threading

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine.compile import Options, compile_engine
from engine.target import detect
from engine.timing import measure
from modeling.config import vit_config

name, batch = sys.argv[1], int(sys.argv[2])
cfg = vit_config(name, "ait")
target = detect("cuda")
m, _ = wu.source_model(cfg, seed=0)
model = wu.build_engine(cfg, wu.convert(m, cfg), torch.float16, target.device)
graphed = compile_engine(model, batch, target, Options(use_graph=True))
images = graphed._static_in


def clocks(stop, seen):
    while not stop.is_set():
        out = subprocess.run(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader"],
                             capture_output=True, text=True).stdout.strip()
        seen.append(out)
        stop.wait(0.25)


for label, fn in [("graph", graphed.run), ("eager", lambda: model(images)), ("graph again", graphed.run)]:
    stop, seen = threading.Event(), []
    t = threading.Thread(target=clocks, args=(stop, seen))
    t.start()
    with torch.no_grad():
        timing = measure(fn, target.device, warmup_s=0.5, budget_s=3.0)
    stop.set()
    t.join()
    print(f"{name} bs{batch} {label}: {timing}; clocks/power {seen[len(seen)//2] if seen else '?'} .. {seen[-1] if seen else '?'}")
