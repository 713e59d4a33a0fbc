"""A/B of GEMM tile candidates end to end: the engine planned without the tiles named in
AB_DROP and with every candidate plus those named in AB_ADD, both graphs in one process, timed
in alternation (the GPU's clock drifts between sequential runs, so two separate runs cannot
resolve a few percent).

    AB_DROP="m64n128k128w4s4x1f m64n64k128w4s4x1f" AB_ADD="m64n64k128w4s4x1fr" python3 tools/ab_tiles.py MODEL:BATCH [...]
"""
import os
import statistics
import sys
import tempfile
from unittest import mock

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine.compile import Options, compile_engine
from engine.target import detect
from engine.timing import measure
from modeling import kernels
from modeling.config import vit_config

target = detect("cuda")
drop = set(os.environ.get("AB_DROP", "").split())
add = tuple(os.environ.get("AB_ADD", "").split())
kept = tuple(t for t in kernels.GEMM_TILE_CANDIDATES if t not in drop)
for spec in sys.argv[1:]:
    name, batch = spec.split(":")
    batch = int(batch)
    cfg = vit_config(name, "ait")
    model = wu.seeded_engine(cfg, torch.float16, target.device)
    engines = {}
    for label, candidates in (("without", kept), ("with", kernels.GEMM_TILE_CANDIDATES + add)):
        with mock.patch.object(kernels, "GEMM_TILE_CANDIDATES", candidates):
            engines[label] = compile_engine(model, batch, target, Options(), cache_root=tempfile.mkdtemp(), log=print)
        print(f"{spec} {label} {' '.join(sorted(drop | set(add)))}: plan {engines[label].plan}")
    times = {label: [] for label in engines}
    with torch.no_grad():
        for _ in range(4):
            for label, e in engines.items():
                times[label].append(measure(e.run, target.device, warmup_s=0.2, budget_s=1.0).median_ms)
    for label, ts in times.items():
        print(f"{spec} {label}: median {statistics.median(ts):.4f} ms, rounds {', '.join(f'{t:.4f}' for t in ts)}")
    print(f"{spec} speedup with them {statistics.median(times['without']) / statistics.median(times['with']):.3f}x")
    sys.stdout.flush()
