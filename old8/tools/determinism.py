"""Are the engine's outputs bitwise repeatable? Compiles each size twice, with the default options
(split-K tiles allowed) and with --deterministic, runs each on one fixed input 50 times, and
counts runs whose logits differ from the first run's (and by how much), beside the latency.

    python3 tools/determinism.py MODEL:BATCH [...]
"""
import sys
import tempfile

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine.compile import Options, compile_engine
from engine.target import detect
from engine.timing import measure
from modeling.config import vit_config

target = detect("cuda")
for spec in sys.argv[1:]:
    name, batch = spec.split(":")
    cfg = vit_config(name, "ait")
    model = wu.build_engine(cfg, wu.convert(wu.source_model(cfg, seed=0)[0], cfg), torch.float16, target.device)
    images = torch.randn(int(batch), cfg.in_chans, *cfg.img_size, generator=torch.Generator().manual_seed(1))
    images = images.to(target.device, torch.float16)
    for deterministic in (False, True):
        engine = compile_engine(model, int(batch), target, Options(deterministic=deterministic),
                                cache_root=tempfile.mkdtemp(), log=print)
        first = engine(images)
        outs = [engine(images) for _ in range(50)]
        differ = [o for o in outs if not torch.equal(o, first)]
        worst = max(((o.float() - first.float()).abs().max().item() for o in differ), default=0.0)
        ms = measure(engine.run, target.device, warmup_s=0.2, budget_s=1.0).median_ms
        tiles = {k: v for k, v in engine.plan.as_dict().items() if k.endswith("_tile") and "sk" in v}
        print(f"{spec} deterministic={deterministic}: {len(differ)}/50 runs differ from the first "
              f"(max abs diff {worst:.2e}, logits up to {first.float().abs().max().item():.1f}); "
              f"{ms:.4f} ms; split tiles {tiles or 'none'}")
        sys.stdout.flush()
