"""The block GEMMs at the models' real shapes, one device call: the cuBLAS call torch makes (its
heuristic's first algorithm) beside every algorithm cuBLASLt's heuristic offers
(modeling/cublaslt.py), each timed in CUDA graphs as the plan does and checked against float32.
The default call is timed again at the end of each site, to show the clock drifting under the
power cap.

    [LT_COUNT=16] python3 tools/lt_algos.py [MODEL:BATCH[:DTYPE] ...]
"""
import os
import sys

import torch

from engine.compile import graphed_ms
from modeling import cublaslt
from modeling.config import vit_config

dev = torch.device("cuda")
COUNT = int(os.environ.get("LT_COUNT", "16"))
specs = [a.split(":") for a in sys.argv[1:]] or [("vit_base_patch16_224", "256"), ("vit_large_patch16_384", "256")]


def timed(fn):
    return graphed_ms(fn, dev, budget_s=0.12)


for spec in specs:
    name, batch = spec[0], int(spec[1])
    dtype = getattr(torch, spec[2]) if len(spec) > 2 else torch.float16
    cfg = vit_config(name, "ait")
    M, D, H = batch * cfg.seq_len, cfg.embed_dim, cfg.mlp_hidden
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).to(dtype)
    x, hidden = rnd(M, D), rnd(M, H)
    sites = {  # name: (A, W, bias, epilogue, residual)
        "qkv": (x, rnd(3 * D, D, scale=D ** -0.5), rnd(3 * D), "bias", False),
        "fc1+gelu": (x, rnd(H, D, scale=D ** -0.5), rnd(H), "gelu_bias", False),
        "proj+=": (x, rnd(D, D, scale=D ** -0.5 / 64), None, "none", True),
        "fc2+=": (hidden, rnd(D, H, scale=H ** -0.5 / 64), None, "none", True),
    }
    print(f"== {name} batch {batch} {dtype} (M={M})", flush=True)
    for site, (a, w, b, epilogue, residual) in sites.items():
        flops = 2 * a.shape[0] * a.shape[1] * w.shape[0]
        stream = rnd(M, w.shape[0]) if residual else None
        if residual:
            default = lambda a=a, w=w, s=stream.clone(): s.addmm_(a, w.t())  # noqa: E731
            want = stream.float() + a.float() @ w.float().t()
        elif epilogue == "gelu_bias":
            default = lambda a=a, w=w, b=b: torch._addmm_activation(b, a, w.t(), use_gelu=True)  # noqa: E731
            want = torch.nn.functional.gelu(torch.addmm(b.float(), a.float(), w.float().t()), approximate="tanh")
        else:
            default = lambda a=a, w=w, b=b: torch.addmm(b, a, w.t())  # noqa: E731
            want = torch.addmm(b.float(), a.float(), w.float().t())
        p = cublaslt.Problem(M, w.shape[0], a.shape[1], dtype, epilogue, residual)
        base = timed(default)
        rows = []
        for i, (algo, _) in enumerate(cublaslt.algorithms(p, COUNT)):
            out = stream.clone() if residual else None
            try:
                got = cublaslt.matmul(p, i, a, w, b, out=out, count=COUNT)
                err = ((got.float() - want).abs().max() / want.abs().max()).item()
                o = stream.clone() if residual else torch.empty_like(want, dtype=dtype)
                t = timed(lambda i=i, a=a, w=w, b=b, o=o: cublaslt.matmul(p, i, a, w, b, out=o, count=COUNT))
                rows.append((f"lt{i} {cublaslt.describe(algo)}", t, err))
            except Exception as e:  # noqa: BLE001 (report and go on)
                rows.append((f"lt{i} {cublaslt.describe(algo)}: {type(e).__name__} {e}"[:120], float("nan"), 0.0))
        again = timed(default)
        print(f"  {site:10s} torch default {base * 1e3:8.1f} us  ({flops / base / 1e9:5.0f} TFLOP/s), "
              f"again {again * 1e3:8.1f} us")
        for label, t, err in sorted(rows, key=lambda r: (r[1] != r[1], r[1])):
            print(f"    {label:48s} {t * 1e3:8.1f} us  {t / min(base, again):6.3f}x  err {err:.1e}")
        print(flush=True)
