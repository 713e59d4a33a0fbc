"""cuBLASLt's configuration space beyond its heuristic's top eight, at the block GEMMs' real shapes.

The heuristic ranks a handful of configurations by a model of the GPU. Each algorithm id can also be
configured by hand (tile, stages, cluster shape, CTA swizzling, custom option) and validated with
cublasLtMatmulAlgoCheck; this tool enumerates those around the heuristic's picks and across every
algorithm id, times as many as a budget allows (CUDA graphs, as the plan times), re-times the best
few against the heuristic's best in alternation, and checks each finalist against float32.

    [LT_BUDGET_S=30] [LT_FINALISTS=5] [LT_SUSTAIN_S=0] python3 tools/lt_configs.py [MODEL:BATCH:SITE[:DTYPE] ...]
    SITE: qkv fc1 proj fc2

LT_SUSTAIN_S > 0 re-times the finalists sustained (each back to back for that long, the first half
untimed), as the plan does from engine 13: at the power cap short timings favour power-hungry
configurations (perf-notes attempt 45), and the table below was first chosen by short ones.
"""
import os
import random
import statistics
import sys
import time

import torch

from engine.compile import _graphed, _sustained_ms
from engine.timing import measure
from modeling import cublaslt
from modeling.config import vit_config

dev = torch.device("cuda")
BUDGET_S = float(os.environ.get("LT_BUDGET_S", "30"))
FINALISTS = int(os.environ.get("LT_FINALISTS", "5"))
SUSTAIN_S = float(os.environ.get("LT_SUSTAIN_S", "0"))
specs = [a.split(":") for a in sys.argv[1:]] or [("vit_base_patch16_224", "256", "fc1")]


def timed(fn, calls=5, budget_s=0.06):
    return measure(_graphed(fn, calls), dev, warmup_s=0.02, min_iters=5, max_iters=100,
                   budget_s=budget_s).median_ms / calls


def candidates(p, heuristic):
    """Configurations to check: one attribute of each heuristic pick changed at a time, and every
    (tile, stages) of every algorithm id (tile and stages 0, "undefined", where it lists none) at
    cluster, swizzling and custom option 0."""
    configs = {}
    for algo, _ in heuristic:
        c = dict(part_split(cublaslt.describe(algo)))
        caps = cublaslt.capabilities(p, c["id"])
        for key, values in (("tile", caps["tiles"]), ("stages", caps["stages"]), ("cluster", range(0, 24)),
                            ("swizzle", range(0, 2 if caps["swizzle"] else 1)),
                            ("custom", range(0, caps["custom_max"] + 1))):
            for v in values:
                configs[(c["id"], *(v if k == key else c.get(k, 0) for k in ("tile", "stages", "cluster", "swizzle",
                                                                           "custom")))] = None
    for algo_id in cublaslt.algorithm_ids(p):
        caps = cublaslt.capabilities(p, algo_id)
        print(f"    id {algo_id}: {len(caps['tiles'])} tiles, {len(caps['stages'])} stage ids, swizzle {caps['swizzle']}, "
              f"custom options {caps['custom_max']}, split-K {caps['splitk']}, epilogue mask {caps['epilogues']:#x}",
              flush=True)
        for tile in caps["tiles"] or [0]:
            for stages in caps["stages"] or [0]:
                configs[(algo_id, tile, stages, 0, 0, 0)] = None
    return list(configs)


def part_split(text):
    for part in text.split("-"):
        name = part.rstrip("0123456789")
        yield name, int(part[len(name):])


for spec in specs:
    name, batch, site = spec[0], int(spec[1]), spec[2]
    dtype = getattr(torch, spec[3]) if len(spec) > 3 else torch.float16
    cfg = vit_config(name, "ait")
    M, D, H = batch * cfg.seq_len, cfg.embed_dim, cfg.mlp_hidden
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)
    n, k, epilogue, residual = {"qkv": (3 * D, D, "bias", False), "fc1": (H, D, "gelu_bias", False),
                                "proj": (D, D, "none", True), "fc2": (D, H, "none", True)}[site]
    a, w = rnd(M, k), rnd(n, k, scale=k ** -0.5)
    bias = rnd(n) if epilogue != "none" else None
    stream = rnd(M, n) if residual else None
    p = cublaslt.Problem(M, n, k, dtype, epilogue, residual)
    flops = 2 * M * n * k
    want = a.float() @ w.float().t()
    if residual:
        want += stream.float()
    if bias is not None:
        want += bias.float()
    if epilogue == "gelu_bias":
        want = torch.nn.functional.gelu(want, approximate="tanh")
    out = stream.clone() if residual else torch.empty(M, n, device=dev, dtype=dtype)
    print(f"== {name} batch {batch} {site} {dtype} (M={M} N={n} K={k}, {epilogue}{', +=' if residual else ''})",
          flush=True)

    heuristic = list(cublaslt.algorithms(p))
    t0 = time.perf_counter()
    configs = candidates(p, heuristic)
    valid = []
    for c in configs:
        found = cublaslt.configured(p, *c)
        if found is not None:
            valid.append((c, *found))
    print(f"  {len(configs)} configurations asked, {len(valid)} pass cuBLASLt's check "
          f"({time.perf_counter() - t0:.1f} s)", flush=True)

    def runner(algo, nbytes):
        if residual:
            out.copy_(stream)  # each configuration adds into a fresh copy of the stream
        return lambda: cublaslt.run(p, algo, nbytes, a, w, bias, out=out)

    timings = {}
    for i, (algo, nbytes) in enumerate(heuristic):
        timings[f"h{i} {cublaslt.describe(algo)}"] = (timed(runner(algo, nbytes)), algo, nbytes)
    random.Random(0).shuffle(valid)
    t0, tried = time.perf_counter(), 0
    for c, algo, nbytes in valid:
        if time.perf_counter() - t0 > BUDGET_S:
            break
        label = cublaslt.describe(algo)
        if any(key.endswith(label) for key in timings):
            continue
        try:
            timings[label] = (timed(runner(algo, nbytes)), algo, nbytes)
        except cublaslt.CublasLtError as e:
            print(f"    {label}: {e}", flush=True)
        tried += 1
    print(f"  timed {tried} of {len(valid)} valid configurations in {time.perf_counter() - t0:.1f} s", flush=True)
    ranked = sorted(timings.items(), key=lambda kv: kv[1][0])
    best_h = min((kv for kv in timings.items() if kv[0].startswith("h")), key=lambda kv: kv[1][0])
    finalists = dict(ranked[:FINALISTS])
    finalists[best_h[0]] = best_h[1]
    again = {label: [] for label in finalists}
    for _ in range(1 if SUSTAIN_S else 3):  # alternate, so a clock drift under the power cap hits every finalist alike
        for label, (first, algo, nbytes) in finalists.items():
            if SUSTAIN_S:
                again[label].append(_sustained_ms(_graphed(runner(algo, nbytes), 5), 5, first, SUSTAIN_S))
            else:
                again[label].append(timed(runner(algo, nbytes), budget_s=0.2))
    base = statistics.median(again[best_h[0]])
    print(f"  finalists re-timed {'sustained, ' + str(SUSTAIN_S) + ' s each' if SUSTAIN_S else 'in alternation'}",
          flush=True)
    for label, (first, algo, nbytes) in sorted(finalists.items(), key=lambda kv: statistics.median(again[kv[0]])):
        t = statistics.median(again[label])
        got = (stream.clone() if residual else torch.empty_like(out))
        cublaslt.run(p, algo, nbytes, a, w, bias, out=got)
        err = ((got.float() - want).abs().max() / want.abs().max()).item()
        print(f"    {label:60s} {t * 1e3:8.1f} us ({flops / t / 1e9:4.0f} TFLOP/s) {t / base:6.3f}x "
              f"first {first * 1e3:7.1f}  ws {nbytes >> 10} KiB  err {err:.1e}", flush=True)
    rest = [(lab, v) for lab, v in ranked if lab not in finalists][:8]
    print("  next best first timings: " + ", ".join(f"{lab} {v[0] * 1e3:.1f}" for lab, v in rest), flush=True)
    print(flush=True)
