"""A/B of the split-K GEMM candidates end to end: the engine planned without them and with them,
both graphs in one process, timed in alternation (the GPU's clock drifts between sequential runs).

    python3 tools/ab_split_k.py MODEL:BATCH [...]      e.g. vit_large_patch16_384:1
"""
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
for spec in sys.argv[1:]:
    name, batch = spec.split(":")
    batch = int(batch)
    cfg = vit_config(name, "ait")
    model = wu.build_engine(cfg, wu.convert(wu.source_model(cfg, seed=0)[0], cfg), torch.float16, target.device)
    engines = {}
    for label, bases in (("without split-K", ()), ("with split-K", kernels.SPLIT_K_BASES)):
        with mock.patch.object(kernels, "SPLIT_K_BASES", bases):
            engines[label] = compile_engine(model, batch, target, Options(), cache_root=tempfile.mkdtemp(), log=print)
        e = engines[label]
        print(f"{spec} {label}: compile {e.info['compile_s']} s, plan {e.plan}")
    times = {label: [] for label in engines}
    with torch.no_grad():
        for _ in range(4):
            for label, e in engines.items():
                times[label].append(measure(e.run, target.device, warmup_s=0.2, budget_s=1.0).median_ms)
    for label, ts in times.items():
        print(f"{spec} {label}: median {statistics.median(ts):.4f} ms over rounds {', '.join(f'{t:.4f}' for t in ts)}")
    a, b = (statistics.median(times[k]) for k in engines)
    print(f"{spec} split-K speedup {a / b:.3f}x")
    sys.stdout.flush()
