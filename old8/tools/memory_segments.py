"""Where a serving process's reserved GPU memory sits, segment by segment: the engine (one CUDA
graph) or PyTorch eager, at one batch size, after the same empty_cache the benchmark does.

    python3 tools/memory_segments.py {ait|pt} MODEL BATCH
"""
import gc
import sys

import torch

import weight_utils as wu
from engine.compile import Options, compile_engine
from engine.target import detect
from modeling.config import vit_config

mode, name, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
target = detect("cuda")
cfg = vit_config(name, "ait")
src, _ = wu.source_model(cfg, seed=0)
if mode == "ait":
    engine = compile_engine(wu.build_engine(cfg, wu.convert(src, cfg), torch.float16, target.device), batch, target,
                            Options(), cache_root="tmp")
    run = engine.run
else:
    net = src.to(target.device, torch.float16)
    images = torch.randn(batch, 3, *cfg.img_size, device="cuda", dtype=torch.float16)

    def run():
        with torch.inference_mode():
            return net(images)
src = None
run()
torch.cuda.synchronize()
gc.collect()
torch.cuda.empty_cache()
torch.cuda.reset_peak_memory_stats()
for _ in range(3):
    run()
torch.cuda.synchronize()
mib = 2 ** 20
print(f"{mode} {name} batch {batch}: reserved {torch.cuda.max_memory_reserved() / mib:.1f} MiB, "
      f"allocated {torch.cuda.max_memory_allocated() / mib:.1f} MiB")
for seg in sorted(torch.cuda.memory_snapshot(), key=lambda s: -s["total_size"]):
    blocks = seg["blocks"]
    big = sorted((b["size"] for b in blocks if b["state"] == "active_allocated"), reverse=True)[:4]
    print(f"  segment {seg['total_size'] / mib:7.2f} MiB  {seg['segment_type']:5s} pool {seg.get('segment_pool_id')} "
          f"stream {seg['stream']}  allocated {seg['allocated_size'] / mib:7.2f}  "
          f"largest blocks {[round(b / mib, 2) for b in big]}")
