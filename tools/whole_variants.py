"""Attempt 42 experiment: the whole-sequence attention kernel's variants at ViT-B/16 shapes.

    python3 tools/whole_variants.py [BATCH ...]
"""
import sys

import torch

from engine.compile import _graphed
from engine.timing import measure
from modeling import kernels, ops

dev = torch.device("cuda")
heads, hd, seq = 12, 64, 196


def timed(fn, calls=5):
    return measure(_graphed(fn, calls), dev, warmup_s=0.05, min_iters=10, max_iters=200, budget_s=0.2).median_ms / calls


for batch in [int(b) for b in sys.argv[1:]] or [64, 256]:
    qkv = torch.randn(batch * seq, 3 * heads * hd, device=dev, dtype=torch.float16)
    want = ops.attention_reference(qkv, batch, heads, hd).float()
    flops = 4 * batch * heads * seq * seq * hd

    def cudnn():
        with ops.sdpa_backend("cudnn"):
            return ops.attention(qkv, batch, heads, hd, "cudnn")
    rows = [("cudnn", timed(cudnn), (cudnn().float() - want).abs().max().item())]
    for online in (False, True):
        for one in (False, True):
            kernels.WHOLE_ONLINE, kernels.WHOLE_ONE_PIECE = online, one
            for tile in ("m64w4s1whole", "m64w4s2whole", "m64w4s3whole", "m64w8s2whole", "m128w8s2whole"):
                fn = lambda: ops.attention(qkv, batch, heads, hd, "triton", tile)  # noqa: E731
                try:
                    rows.append((f"{tile} online={online} one_piece={one}", timed(fn), (fn().float() - want).abs().max().item()))
                except Exception as e:
                    print(f"  {tile} online={online} one_piece={one}: {type(e).__name__} {str(e).splitlines()[0][:80]}")
    for compiled in kernels._whole_attention_kernel.device_caches[0][0].values():
        c = compiled.metadata
        print(f"  kernel warps {c.num_warps} stages {c.num_stages} regs {compiled.n_regs} spills {compiled.n_spills} shared {c.shared}")
    print(f"== batch {batch}")
    for label, ms, err in sorted(rows, key=lambda r: r[1]):
        print(f"  {label:45s} {ms * 1e3:8.1f} us {flops / ms / 1e9:6.1f} TFLOP/s  max err {err:.1e}")
    sys.stdout.flush()
