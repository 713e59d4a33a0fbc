"""The Triton LayerNorm at the models' real shapes over a grid of launch shapes (rows per program x
warps), beside the default launch and torch's, each timed in CUDA graphs as the plan does.

    python3 tools/norm_tiles.py [MODEL:BATCH ...]
"""
import sys

import torch
import torch.nn.functional as F

from engine.compile import graphed_ms
from modeling import kernels
from modeling.config import vit_config

dev = torch.device("cuda")
shapes = [a.split(":") for a in sys.argv[1:]] or (
    [("vit_base_patch16_224", b) for b in (1, 8, 256)] + [("vit_large_patch16_384", b) for b in (1, 8, 256)])


def timed(fn):
    return graphed_ms(fn, dev, budget_s=0.15)


for name, batch in shapes:
    cfg = vit_config(name, "ait")
    rows, d = int(batch) * cfg.seq_len, cfg.embed_dim
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(rows, d, device=dev, generator=g).half()
    w, b, s = (torch.randn(d, device=dev, generator=g) for _ in range(3))
    want = F.layer_norm(x.float() + s, (d,), w, b, 1e-6)
    out = torch.empty_like(x)
    results = [("torch", timed(lambda: F.layer_norm(x, (d,), w.half(), b.half(), 1e-6)), 0.0),
               ("default", timed(lambda: kernels.layer_norm(x, w, b, 1e-6, s, out=out)), 0.0)]
    block = 1 << (d - 1).bit_length()
    for per in (1, 2, 4, 8, 16):
        for warps in (1, 2, 4, 8, 16):
            if per * block > 16384 or warps * 32 * 8 > per * block:
                continue  # too many elements per program, or threads with under 8 elements each
            kernels.layer_norm(x, w, b, 1e-6, s, out=out, rows=per, num_warps=warps)
            err = (out.float() - want).abs().max().item()
            t = timed(lambda per=per, warps=warps: kernels.layer_norm(x, w, b, 1e-6, s, out=out, rows=per,
                                                                      num_warps=warps))
            results.append((f"r{per}w{warps}", t, err))
    results.sort(key=lambda r: r[1])
    print(f"== {name} batch {batch} ({rows} x {d}): " + "  ".join(
        f"{n} {t * 1e3:.2f}us" + (f" err {e:.0e}" if e else "") for n, t, e in results[:10]) + "  | default "
        + f"{dict((n, t) for n, t, _ in results)['default'] * 1e3:.2f}us")
    sys.stdout.flush()
