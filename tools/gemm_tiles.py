"""The block GEMMs at the models' real shapes, one device call: cuBLAS (what the engine runs now)
beside the persistent TMA Triton GEMM (kernels.linear) over a grid of tiles (default: the plan's
candidates at that size), each timed in CUDA graphs as the plan does and checked against float32.

    [GEMM_TILES="m128n256k64w8s3x2f ..."] [GEMM_SITES="proj+= fc2+="] python3 tools/gemm_tiles.py [MODEL:BATCH ...]
"""
import os
import sys

import torch
import torch.nn.functional as F

from engine.compile import graphed_ms
from modeling import kernels
from modeling.config import vit_config
from modeling.ops import parse_gemm_tile

dev = torch.device("cuda")
shapes = [a.split(":") for a in sys.argv[1:]] or (
    [("vit_base_patch16_224", b) for b in (1, 64, 256)] + [("vit_large_patch16_384", b) for b in (1, 16, 256)])
TILES = os.environ.get("GEMM_TILES", "").split()  # default: each site's plan candidates (kernels.gemm_tiles)
SITES = os.environ.get("GEMM_SITES", "").split()  # default: all five


def timed(fn):
    return graphed_ms(fn, dev, budget_s=0.12)


for name, batch in shapes:
    batch = int(batch)
    cfg = vit_config(name, "ait")
    M, D, H = batch * cfg.seq_len, cfg.embed_dim, cfg.mlp_hidden
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale).half()
    x, hidden = rnd(M, D), rnd(M, H)
    sites = {  # name: (A, W, bias, act, accumulate, flops, cuBLAS call)
        "qkv": (x, rnd(3 * D, D, scale=D ** -0.5), rnd(3 * D), "", False),
        "fc1+gelu(erf)": (x, rnd(H, D, scale=D ** -0.5), rnd(H), "gelu", False),
        "fc1+gelu(tanh)": (x, rnd(H, D, scale=D ** -0.5), rnd(H), "gelu_tanh", False),
        "proj+=": (x, rnd(D, D, scale=D ** -0.5 / 64), None, "", True),
        "fc2+=": (hidden, rnd(D, H, scale=H ** -0.5 / 64), None, "", True),
    }
    print(f"== {name} batch {batch} (M={M})")
    for site, (a, w, b, act, acc) in sites.items():
        if SITES and site not in SITES:
            continue
        flops = 2 * a.shape[0] * a.shape[1] * w.shape[0]
        stream = rnd(M, w.shape[0]) if acc else None
        if acc:
            ref_fn = lambda a=a, w=w, s=stream: s.addmm_(a, w.t())  # noqa: E731
        elif act == "gelu_tanh":
            ref_fn = lambda a=a, w=w, b=b: torch._addmm_activation(b, a, w.t(), use_gelu=True)  # noqa: E731
        elif act == "gelu":
            ref_fn = lambda a=a, w=w, b=b: F.gelu(F.linear(a, w, b))  # noqa: E731
        else:
            ref_fn = lambda a=a, w=w, b=b: F.linear(a, w, b)  # noqa: E731
        rows = [("cuBLAS", timed(ref_fn), 0.0)]
        want = (stream.float() + a.float() @ w.float().t()) if acc else None
        if not acc:
            want = F.linear(a.float(), w.float(), b.float())
            if act:
                want = F.gelu(want, approximate="tanh" if act == "gelu_tanh" else "none")
        for tile in map(parse_gemm_tile, TILES or kernels.gemm_tiles(M)):
            if not tile.fits() or (tile.split_k > 1 and not acc):
                continue  # cannot launch (shared memory), or split K at a site that does not accumulate
            try:
                if acc:
                    out = stream.clone()
                    kernels.linear(a, w, out=out, accumulate=True, tile=tile)
                    err = ((out.float() - want).abs().max() / want.abs().max()).item()
                    fn = lambda a=a, w=w, o=out, t=tile: kernels.linear(a, w, out=o, accumulate=True, tile=t)  # noqa: E731
                else:
                    err = ((kernels.linear(a, w, b, act, tile=tile).float() - want).abs().max()
                           / want.abs().max()).item()
                    fn = lambda a=a, w=w, b=b, act=act, t=tile: kernels.linear(a, w, b, act, tile=t)  # noqa: E731
                rows.append((str(tile), timed(fn), err))
            except Exception as e:  # noqa: BLE001 (shared-memory limits at big tiles)
                print(f"  {site} {tile}: {type(e).__name__} {str(e).splitlines()[0][:90] if str(e) else ''}")
        rows.sort(key=lambda r: r[1])
        top = int(os.environ.get("GEMM_TOP", "6"))
        best = rows[:top] + [r for r in rows[top:] if r[0] == "cuBLAS"]
        print(f"  {site:15s} " + "  ".join(f"{n} {ms * 1e3:.1f}us {flops / ms / 1e9:.0f}TF/s"
                                             + (f" err {e:.0e}" if n != "cuBLAS" else "")
                                             for n, ms, e in best))
        sys.stdout.flush()
