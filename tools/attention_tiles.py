"""Attention at the models' real shapes, one device call: SDPA's backends beside our Triton kernel
over a grid of tiles (query rows, key rows, warps, stages, TMA or pointer loads), each timed in
CUDA graphs as the plan does and checked against the float32 reference.

    python3 tools/attention_tiles.py [MODEL:BATCH ...]   (default: both models, batch 1..256)
"""
import itertools
import sys

import torch

from engine.compile import graphed_ms
from modeling import kernels, ops
from modeling.config import vit_config
from modeling.kernels import AttentionTile

dev = torch.device("cuda")
sms = torch.cuda.get_device_properties(dev).multi_processor_count
shapes = [a.split(":") for a in sys.argv[1:]] or (
    [("vit_base_patch16_224", b) for b in (1, 8, 16, 64, 256)]
    + [("vit_large_patch16_384", b) for b in (1, 4, 16, 64, 256)])


def timed(fn):
    return graphed_ms(fn, dev, budget_s=0.12)


for name, batch in shapes:
    batch = int(batch)
    cfg = vit_config(name, "ait")
    seq, heads, hd = cfg.seq_len, cfg.num_heads, cfg.head_dim
    flops = 4 * batch * heads * seq * seq * hd
    qkv = torch.randn(batch * seq, 3 * heads * hd, device=dev, dtype=torch.float16)
    want = ops.attention_reference(qkv, batch, heads, hd).float()
    rows = []
    for backend in ("cudnn", "flash", "efficient"):
        def run(backend=backend):
            with ops.sdpa_backend(backend):
                return ops.attention(qkv, batch, heads, hd, backend)
        try:
            rows.append((backend, timed(run), (run().float() - want).abs().max().item()))
        except RuntimeError as err:
            print(f"  {backend}: {str(err).splitlines()[0][:80]}")
    block_ms = (16, 32, 64) if batch * heads * -(-seq // 64) < 2 * sms else (64, 128)
    tiles = [kernels.default_attention_tile(batch, heads, seq, sms)]
    for bm, bn, w, s, tma in itertools.product(block_ms, (32, 64, 128), (4, 8), (2, 3), (False, True)):
        if (bm >= 128 and w == 4) or (bm <= 32 and w == 8) or (bn == 32 and bm >= 128):
            continue
        tiles.append(AttentionTile(bm, bn, w, s, tma))
    for tile in dict.fromkeys(tiles):
        fn = lambda tile=tile: kernels.attention(qkv, batch, heads, hd, tile=tile)  # noqa: E731
        try:
            err = (fn().float() - want).abs().max().item()
            rows.append((f"triton {tile}", timed(fn), err))
        except Exception as e:  # resource limits (shared memory) at big tiles
            print(f"  triton {tile}: {type(e).__name__} {str(e).splitlines()[0][:80]}")
    rows.sort(key=lambda r: r[1])
    print(f"== {name} batch {batch} (T={seq}, H={heads}, hd={hd}, {flops / 1e9:.1f} GFLOP per layer)")
    default = str(tiles[0])
    for label, ms, err in rows[:8] + [r for r in rows[8:] if r[0] in ("cudnn", "flash", f"triton {default}")]:
        print(f"  {label:28s} {ms * 1e3:9.1f} us  {flops / ms / 1e9:6.1f} TFLOP/s  max err {err:.1e}")
    sys.stdout.flush()
