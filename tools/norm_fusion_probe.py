"""Attempt 21 at the models' real shapes, one device call: LayerNorm with no pass of its own. The
residual GEMMs (proj, fc2) add each row's sum and sum of squares into a small buffer by atomics
in their epilogue (stats_out); the GEMMs after the norms (qkv, fc1) take the raw residual stream
and apply the statistics in their epilogue, the norm's scale folded into the weight (norm_in).
Each site: the best plain GEMM (cuBLAS or our tiles) beside the best fused one, in CUDA graphs as
the plan times them, and the LayerNorm pass the fusion removes.

    python3 tools/norm_fusion_probe.py [MODEL:BATCH ...]
"""
import sys

import torch

from engine.compile import _graphed
from engine.timing import measure
from modeling import kernels, ops
from modeling.config import vit_config

dev = torch.device("cuda")
shapes = [a.split(":") for a in sys.argv[1:]] or (
    [("vit_base_patch16_224", b) for b in (1, 16, 256)] + [("vit_large_patch16_384", b) for b in (1, 16, 256)])


def timed(fn, calls=5):
    return measure(_graphed(fn, calls), dev, warmup_s=0.05, min_iters=10, max_iters=200, budget_s=0.12).median_ms / calls


def rel(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def fastest(cands):
    rows = []
    for name, fn in cands.items():
        try:
            fn()
            rows.append((timed(fn), name))
        except Exception as e:  # noqa: BLE001 (shared-memory limits, unsupported tiles)
            print(f"    {name}: {type(e).__name__} {str(e).splitlines()[0][:90] if str(e) else ''}")
    return min(rows)


for name, batch in shapes:
    batch = int(batch)
    cfg = vit_config(name, "ait")
    M, D, H = batch * cfg.seq_len, cfg.embed_dim, cfg.mlp_hidden
    g = torch.Generator(device=dev).manual_seed(0)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, device=dev, generator=g) * scale + shift).half()
    x = rnd(M, D, scale=2.0, shift=0.3)
    gamma, beta, shift = (torch.randn(D, device=dev, generator=g) * s + o for s, o in ((0.3, 1.0), (0.1, 0), (0.5, 0)))
    tiles = [ops.parse_gemm_tile(t) for t in kernels.gemm_tiles(M)]
    print(f"== {name} batch {batch} (M={M})")
    normed = ops.layer_norm(x, gamma, beta, cfg.norm_eps, shift, "triton")
    t_ln = timed(lambda: ops.layer_norm(x, gamma, beta, cfg.norm_eps, shift, "triton", out=normed))
    stats = ops.row_stats(x, shift)
    print(f"  layer_norm pass (removed by the fusion): {t_ln * 1e3:.1f} us")
    extra = 0.0
    for site, n_out, act in (("qkv", 3 * D, ""), ("fc1", H, "gelu_tanh")):
        w, b = rnd(n_out, D, scale=D ** -0.5), rnd(n_out, scale=0.1)
        wf, bf = ops.fold_norm(gamma, beta, w, b)
        bf16 = bf.half()
        cols = ops.norm_columns(wf, shift)
        want = ops.linear(normed.float(), w.float(), b.float())
        want = ops.gelu(want, "gelu_tanh") if act else want
        out = torch.empty(M, n_out, device=dev, dtype=torch.float16)
        plain = {"cuBLAS": (lambda: torch._addmm_activation(bf16, normed, wf.t(), use_gelu=True)) if act
                 else (lambda: torch.addmm(bf16, normed, wf.t(), out=out))}
        plain.update({str(t): (lambda t=t: kernels.linear(normed, wf, bf16, act, out=out, tile=t)) for t in tiles})
        fused = {str(t): (lambda t=t: kernels.linear(x, wf, bf16, act, out=out, tile=t,
                                                     norm_in=(stats, cols, cfg.norm_eps))) for t in tiles}
        (tp, np_), (tf, nf) = fastest(plain), fastest(fused)
        extra += tf - tp
        got = fused[nf]()
        print(f"  {site:4s} plain {np_} {tp * 1e3:.1f} us, norm_in {nf} {tf * 1e3:.1f} us "
              f"({(tf - tp) * 1e3:+.1f} us), err vs LayerNorm + GEMM {rel(got, want):.1e}")
    for site, k_in in (("proj", D), ("fc2", H)):
        a, w = rnd(M, k_in), rnd(D, k_in, scale=k_in ** -0.5 / 64)
        stream = x.clone()
        acc_stats, clear = torch.zeros(2, M, device=dev), torch.ones(2, M, device=dev)
        plain = {"cuBLAS": lambda: stream.addmm_(a, w.t())}
        plain.update({str(t): (lambda t=t: kernels.linear(a, w, out=stream, accumulate=True, tile=t)) for t in tiles})
        fused = {str(t): (lambda t=t: kernels.linear(a, w, out=stream, accumulate=True, tile=t,
                                                     stats_out=(acc_stats, clear, shift))) for t in tiles}
        (tp, np_), (tf, nf) = fastest(plain), fastest(fused)
        extra += tf - tp
        stream.copy_(x)
        acc_stats.zero_()
        clear.fill_(1.0)
        fused[nf]()
        err = rel(acc_stats, ops.row_stats(stream, shift))
        print(f"  {site:4s} plain {np_} {tp * 1e3:.1f} us, stats_out {nf} {tf * 1e3:.1f} us "
              f"({(tf - tp) * 1e3:+.1f} us), stats err {err:.1e}, clear {clear.abs().max().item():.0f}")
    print(f"  per block: two LayerNorm passes {2 * t_ln * 1e3:.1f} us removed, GEMMs {extra * 1e3:+.1f} us: "
          f"net {(2 * t_ln - extra) * 1e3:+.1f} us x {cfg.depth} blocks = {(2 * t_ln - extra) * cfg.depth:.3f} ms")
    sys.stdout.flush()
