"""Nsight Compute's view of the attention kernels at one shape: cuDNN (through torch's SDPA),
our Triton tiles, our CUDA C++ kernel, and (when modeling/kernels46.py holds commit 5d5bd54's kernels) attempt 46's
whole-head kernel. Each runs once to compile, then once inside the profiled range.

    ncu --profile-from-start off --section SpeedOfLight ... python3 tools/attention_ncu.py [MODEL:BATCH]
"""
import sys

import torch

from modeling import ops
from modeling.config import vit_config

name, batch = (sys.argv[1] if len(sys.argv) > 1 else "vit_base_patch16_224:256").split(":")
batch = int(batch)
cfg = vit_config(name, "ait")
seq, heads, hd = cfg.seq_len, cfg.num_heads, cfg.head_dim
qkv = torch.randn(batch * seq, 3 * heads * hd, device="cuda", dtype=torch.float16)
runs = {"cudnn": lambda: ops.attention(qkv, batch, heads, hd, "cudnn")}
for tile in ("m64n64w4s3", "m128n64w8s3tma"):
    runs[tile] = lambda tile=tile: ops.attention(qkv, batch, heads, hd, "triton", tile)
for variant in ("w2s2p", "w2s2"):  # modeling/cuda_attention.py
    runs[f"cuda {variant}"] = lambda variant=variant: ops.attention(qkv, batch, heads, hd, "cuda", variant)
try:
    from modeling import kernels46
    for tile in ("h128w8s2p2", "h64w4s1p0"):
        t = kernels46.AttentionTile(int(tile[1:tile.index("w")]), 0, int(tile[tile.index("w") + 1]),
                                    int(tile[tile.index("s") + 1]), True, int(tile[-1]))
        runs[tile] = lambda t=t: kernels46.attention(qkv, batch, heads, hd, tile=t)
except ImportError:
    pass
for label, fn in runs.items():
    with ops.sdpa_backend("cudnn" if label == "cudnn" else "auto"):
        fn()
torch.cuda.synchronize()
for label, fn in runs.items():
    with ops.sdpa_backend("cudnn" if label == "cudnn" else "auto"):
        torch.cuda.nvtx.range_push(label)
        torch.cuda.profiler.start()
        fn()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        torch.cuda.nvtx.range_pop()
    print("ran", label, flush=True)
