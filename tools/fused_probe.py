"""Attempts 18-20 at the models' real shapes, one device call, each timed in CUDA graphs as the
plan does and checked against its reference:
  - LayerNorm folded into the next GEMM (qkv, fc1) vs a separate Triton LayerNorm + the GEMM;
  - fc1's tanh-GELU epilogue in packed float16 (gelu_tanh_h2) vs float32 (gelu_tanh) vs cuBLASLt;
  - attention with float16-pair exponentials (tile suffix h2) vs float32.

    python3 tools/fused_probe.py [MODEL:BATCH ...]
"""
import sys

import torch
import torch.nn.functional as F

from engine.compile import _graphed
from engine.timing import measure
from modeling import kernels, ops
from modeling.config import vit_config

dev = torch.device("cuda")
sms = torch.cuda.get_device_properties(dev).multi_processor_count
shapes = [a.split(":") for a in sys.argv[1:]] or (
    [("vit_base_patch16_224", b) for b in (1, 64, 256)] + [("vit_large_patch16_384", b) for b in (1, 16, 256)])


def timed(fn, calls=5):
    return measure(_graphed(fn, calls), dev, warmup_s=0.05, min_iters=10, max_iters=200, budget_s=0.12).median_ms / calls


def rel(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def best(rows):
    rows = [r for r in rows if r[1] is not None]
    return min(rows, key=lambda r: r[1]) if rows else ("-", float("nan"), 0.0)


def show(label, rows, top=4):
    rows = sorted((r for r in rows if r[1] is not None), key=lambda r: r[1])
    print(f"  {label:22s} " + "  ".join(f"{n} {ms * 1e3:.1f}us err {e:.0e}" for n, ms, e in rows[:top]))
    sys.stdout.flush()


def attempt(name, fn, want):
    try:
        out = fn()
        return (name, timed(fn), rel(out, want))
    except Exception as e:  # noqa: BLE001 (resource limits at big tiles, unsupported asm)
        print(f"    {name}: {type(e).__name__} {str(e).splitlines()[0][:100] if str(e) else ''}")
        return (name, None, 0.0)


for name, batch in shapes:
    batch = int(batch)
    cfg = vit_config(name, "ait")
    M, D, H = batch * cfg.seq_len, cfg.embed_dim, cfg.mlp_hidden
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale + shift).half()
    x = rnd(M, D, scale=2.0, shift=0.3)
    gamma, beta, shift = (torch.randn(D, device=dev, generator=g) * s + o for s, o in ((0.3, 1.0), (0.1, 0), (0.5, 0)))
    ones, zeros = torch.ones(D, device=dev), torch.zeros(D, device=dev)
    tiles = [ops.parse_gemm_tile(t) for t in kernels.gemm_tiles(M)]
    print(f"== {name} batch {batch} (M={M})")
    normed = ops.layer_norm(x, ones, zeros, cfg.norm_eps, shift, "triton")
    t_norm = timed(lambda: ops.layer_norm(x, ones, zeros, cfg.norm_eps, shift, "triton", out=normed))
    print(f"  layer_norm (triton)    {t_norm * 1e3:.1f}us")
    for site, n_out, act in (("qkv", 3 * D, ""), ("fc1", H, "gelu_tanh")):
        w, b = rnd(n_out, D, scale=D ** -0.5), rnd(n_out, scale=0.1)
        wf, bf, cols = ops.fold_norm(gamma, beta, shift, w, b)
        bf = bf.half()
        want = ops.linear(ops.layer_norm_reference(x.float(), gamma, beta, cfg.norm_eps, shift), w.float(), b.float())
        if act:
            want = F.gelu(want, approximate="tanh")
        out = torch.empty(M, n_out, device=dev, dtype=torch.float16)
        sep = []
        if act:
            sep.append(attempt("cuBLASLt-gelu", lambda: torch._addmm_activation(bf, normed, wf.t(), use_gelu=True), want))
        else:
            sep.append(attempt("cuBLAS", lambda: torch.addmm(bf, normed, wf.t(), out=out), want))
        folded = []
        for act_name in ((act, "gelu_tanh_h2") if act else ("",)):
            for t in tiles:
                sep.append(attempt(f"{act_name or 'bias'}:{t}", lambda t=t, a=act_name: kernels.linear(
                    normed, wf, bf, a, out=out, tile=t), want))
                folded.append(attempt(f"fold-{act_name or 'bias'}:{t}", lambda t=t, a=act_name: kernels.linear(
                    x, wf, bf, a, out=out, tile=t, norm=(shift, cols, cfg.norm_eps)), want))
        show(f"{site} after LN", sep)
        show(f"{site} folded", folded)
        s_name, s_ms, _ = best(sep)
        f_name, f_ms, _ = best(folded)
        print(f"  {site}: LN + {s_name} {(t_norm + s_ms) * 1e3:.1f}us vs {f_name} {f_ms * 1e3:.1f}us "
              f"({(t_norm + s_ms) / f_ms:.3f}x)")
    seq, heads, hd = cfg.seq_len, cfg.num_heads, cfg.head_dim
    qkv = rnd(M, 3 * heads * hd)
    want = ops.attention_reference(qkv, batch, heads, hd)
    rows = []
    for t in kernels.attention_tiles(batch, heads, seq, hd, dev, sms):
        for h2 in (False, True):
            tile = kernels.AttentionTile(t.block_m, t.block_n, t.warps, t.stages, t.tma, h2)
            rows.append(attempt(str(tile), lambda tile=tile: kernels.attention(qkv, batch, heads, hd, tile), want))
    show("attention", rows, top=6)
    f32, h2 = best([r for r in rows if not r[0].endswith("h2")]), best([r for r in rows if r[0].endswith("h2")])
    print(f"  attention: best float32 exp {f32[0]} {f32[1] * 1e3:.1f}us, best h2 {h2[0]} {h2[1] * 1e3:.1f}us")
