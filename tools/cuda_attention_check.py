"""modeling/cuda_attention.py on the GPU: its numbers against the float32 reference at ViT-B/16's
196 tokens and odd shapes, registers and local memory per thread, and its time in CUDA graphs beside
cuDNN and our best Triton tile.

    python3 tools/cuda_attention_check.py [BATCH ...] [NAME=VALUE ...]   (default 1 2 64 256)

NAME=VALUE arguments are #defines put before the kernel's source (one it has no #ifndef for is an error).
"""
import ctypes
import sys

import torch

from engine.compile import graphed_ms
from modeling import cuda_attention as ca
from modeling import ops
from attention_probe import defines_from

dev = torch.device("cuda")
torch.manual_seed(0)
DEFINES = defines_from(sys.argv[1:])
_source = ca.source
ca.source = lambda *a, **k: DEFINES + _source(*a, **k)
if DEFINES:
    print("kernel built with:", DEFINES.replace("\n", "; "), flush=True)


def timed(fn):
    return graphed_ms(fn, dev, budget_s=0.2)


def rel(got, want):
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


for seq, heads, batch in ((196, 12, 2), (37, 3, 3), (256, 2, 2), (129, 4, 5)):
    for dtype in (torch.float16, torch.bfloat16):
        qkv = torch.randn(batch * seq, 3 * heads * 64, device=dev, dtype=dtype)
        want = ops.attention_reference(qkv, batch, heads, 64)
        for variant in ca.KNOWN_VARIANTS:
            got = ca.attention(qkv, batch, heads, variant=variant)
            print(f"T={seq} H={heads} B={batch} {dtype} {variant}: rel err {rel(got, want):.2e}", flush=True)
cuda = ctypes.CDLL("libcuda.so.1")
for variant in ca.KNOWN_VARIANTS:
    k = ca._kernel(196, 12, torch.float16, variant, 0)
    for name, attr in (("registers", 4), ("local bytes", 3)):
        v = ctypes.c_int()
        cuda.cuFuncGetAttribute(ctypes.byref(v), attr, k.func)
        print(f"kernel {variant} {name} per thread: {v.value}")

for batch in [int(b) for b in sys.argv[1:] if b.isdigit()] or (1, 2, 64, 256):
    seq, heads = 196, 12
    qkv = torch.randn(batch * seq, 3 * heads * 64, device=dev, dtype=torch.float16)
    want = ops.attention_reference(qkv, batch, heads, 64)
    out = torch.empty(batch * seq, heads * 64, device=dev, dtype=torch.float16)
    rows = []
    runs = {**{f"cuda {v}": (lambda v=v: ca.attention(qkv, batch, heads, out=out, variant=v)) for v in ca.KNOWN_VARIANTS},
            "cudnn": lambda: ops.attention(qkv, batch, heads, 64, "cudnn"),
            "triton m64n64w4s3": lambda: ops.attention(qkv, batch, heads, 64, "triton", "m64n64w4s3"),
            "triton m64n64w4s3tma": lambda: ops.attention(qkv, batch, heads, 64, "triton", "m64n64w4s3tma")}
    for label, fn in runs.items():
        with ops.sdpa_backend("cudnn" if label == "cudnn" else "auto"):
            err = rel(fn(), want)
            rows.append((timed(fn), label, err))
    flops = 4 * batch * heads * seq * seq * 64
    print(f"== batch {batch}: " + "; ".join(f"{label} {ms * 1e3:.1f} us ({flops / ms / 1e9:.0f} TFLOP/s, rel err {err:.1e})"
                                          for ms, label, err in sorted(rows)), flush=True)
