"""Per-kernel CUDA time of one engine forward, grouped: the plan chosen for the graph, its
kernels launched eagerly (the same kernels the graph replays) under the profiler."""
import sys
from collections import defaultdict

import torch

import modeling  # noqa: F401
from engine.compile import Options, compile_engine
from engine.target import detect
from modeling.config import vit_config
import weight_utils as wu

name, variant, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
cfg = vit_config(name, variant)
target = detect("cuda")
m, _ = wu.source_model(cfg, seed=0)
model = wu.build_engine(cfg, wu.convert(m, cfg), torch.float16, target.device)
engine = compile_engine(model, batch, target, Options())
images = torch.randn(batch, 3, *cfg.img_size, device="cuda", dtype=torch.float16)
forward = model.set_plan(engine.plan)
with torch.no_grad():
    for _ in range(3):
        forward(images)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            forward(images)
        torch.cuda.synchronize()
groups = defaultdict(float)
counts = defaultdict(int)
for evt in prof.key_averages():
    if evt.device_type == torch.autograd.DeviceType.CUDA or getattr(evt, "self_device_time_total", 0) > 0:
        t = getattr(evt, "self_device_time_total", None) or getattr(evt, "self_cuda_time_total", 0)
        groups[evt.key[:90]] += t / 5
        counts[evt.key[:90]] += evt.count // 5
total = sum(groups.values())
print(f"== {name} {variant} batch {batch}: plan {engine.plan}, CUDA time per forward {total / 1e3:.3f} ms")
for k, v in sorted(groups.items(), key=lambda kv: -kv[1])[:22]:
    print(f"{v / 1e3:9.3f} ms  x{counts[k]:<4d} {k}")
