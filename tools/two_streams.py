"""Experiment (perf-notes attempt 43): does splitting a large batch into two halves whose graphs
replay on two streams at once beat one graph of the whole batch? The memory-bound kernels of one
half (LayerNorm, attention, the glue) could overlap the other half's GEMMs under the power cap.

    python3 tools/two_streams.py MODEL:BATCH [CACHE]

Times, alternating, three rounds: the whole-batch engine; the two half-batch engines one after
the other on one stream; the two halves on two streams. Outputs of the concurrent halves are
compared with the whole engine's on the same images (a shared workspace would race and show).
"""
import sys

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine import compile as cp
from engine.target import detect
from engine.timing import measure
from modeling.config import vit_config

spec = sys.argv[1]
cache = sys.argv[2] if len(sys.argv) > 2 else "tmp/two_streams"
name, batch = spec.split(":")
batch = int(batch)
half = batch // 2
target = detect("cuda")
dev = target.device
model = wu.seeded_engine(vit_config(name, "ait"), torch.float16, dev)
whole = cp.compile_engine(model, batch, target, cp.Options(), cache_root=cache, log=print)
a = cp.compile_engine(model, half, target, cp.Options(), cache_root=cache, log=print)
cp._CAPTURE_STREAMS[torch.cuda.current_device()] = torch.cuda.Stream()  # b's own cuBLAS workspaces
b = cp.compile_engine(model, half, target, cp.Options(), cache_root=cache, log=print)
print("plans: whole", whole.plan, "\n       half", a.plan, flush=True)
s1, s2 = torch.cuda.Stream(dev), torch.cuda.Stream(dev)


def sequential():
    a.run()
    b.run()


def concurrent():
    main = torch.cuda.current_stream(dev)
    s1.wait_stream(main)
    s2.wait_stream(main)
    with torch.cuda.stream(s1):
        a.run()
    with torch.cuda.stream(s2):
        b.run()
    main.wait_stream(s1)
    main.wait_stream(s2)


images = torch.randn(whole.input_shape, device=dev, dtype=torch.float16)
want = whole(images).float()
a._static_in.copy_(images[:half])
b._static_in.copy_(images[half:])
for label, fn in (("one stream", sequential), ("two streams", concurrent)):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    err = [(o.float() - w).abs().max().item() for o, w in ((a._static_out, want[:half]), (b._static_out, want[half:]))]
    print(f"halves on {label}: max |half - whole| {err[0]:.2e} / {err[1]:.2e} (logits up to {want.abs().max().item():.1f})")
for rnd in range(3):
    for label, fn in (("whole graph", whole.run), ("halves, one stream", sequential), ("halves, two streams", concurrent)):
        t = measure(fn, dev, warmup_s=0.5, budget_s=3.0)
        print(f"round {rnd} {spec} {label:20s} {t.median_ms:8.3f} ms  {batch / t.median_ms * 1e3:8.0f} im/s  "
              f"(p10 {t.p10_ms:.3f}, p90 {t.p90_ms:.3f})", flush=True)
