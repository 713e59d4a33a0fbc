"""Perf experiments, one device call: cuBLASLt algorithm tuning through PyTorch's TunableOp,
float16 accumulation, and the Triton attention tile, each timed beside the current engine."""
import os
import sys
import time

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine.compile import Options, compile_engine
from engine.target import detect
from engine.timing import measure
from engine.verify import compare, random_images
from modeling import ops
from modeling.config import vit_config

target = detect("cuda")
out_dir = os.environ.get("OUT", "out")


def build(name, dtype=torch.float16):
    cfg = vit_config(name, "ait")
    m, _ = wu.source_model(cfg, seed=0)
    return cfg, m, wu.build_engine(cfg, wu.convert(m, cfg), dtype, target.device)


def timed(engine, label):
    t = measure(engine.run, target.device, warmup_s=0.5, budget_s=2.0)
    print(f"{label}: {t}", flush=True)
    return t.median_ms


for name, batches in [("vit_base_patch16_224", (1, 256)), ("vit_large_patch16_384", (1,))]:
    cfg, src, model = build(name)
    for batch in batches:
        base = compile_engine(model, batch, target, Options(), cache_root=f"{out_dir}/cache")
        timed(base, f"{name} bs{batch} engine {base.plan}")
        if name.startswith("vit_large") and batch == 1:
            for bm in (16, 32, 64):
                from modeling import kernels
                qkv = torch.randn(batch * cfg.seq_len, 3 * cfg.embed_dim, device="cuda", dtype=torch.float16)
                t = measure(lambda: kernels.attention(qkv, batch, cfg.num_heads, cfg.head_dim, tile=kernels.AttentionTile(bm)), target.device, budget_s=0.5)
                print(f"  triton attention block_m={bm}: {t}")
        if batch == 256:
            acc = compile_engine(model, batch, target, Options(fp16_acc=True), cache_root=f"{out_dir}/cache")
            timed(acc, f"{name} bs{batch} fp16-acc")
            images = random_images(cfg, 8, 0, "cuda")
            ref = src.to("cuda")(images).float()
            e8 = compile_engine(model, 8, target, Options(fp16_acc=True), cache_root=f"{out_dir}/cache")
            print("  fp16-acc verification:", compare(e8(images.half()).float(), ref, torch.float16).summary())
            src.to("cpu")
            torch.backends.cuda.matmul.allow_fp16_accumulation = False
        base = acc = None
        # TunableOp: tune every GEMM shape among cuBLASLt's algorithms during warm-up
        import torch.cuda.tunable as tunable
        tunable.enable(True)
        tunable.tuning_enable(True)
        tunable.set_max_tuning_duration(30)
        tunable.set_filename(f"{out_dir}/tunable_{name}_{batch}.csv")
        t0 = time.perf_counter()
        tuned = compile_engine(model, batch, target, Options(), cache_root=f"{out_dir}/cache")
        print(f"  tuning+capture took {time.perf_counter() - t0:.1f} s")
        tunable.tuning_enable(False)
        timed(tuned, f"{name} bs{batch} TunableOp")
        tunable.enable(False)
        tuned = None
