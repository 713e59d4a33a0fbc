"""Patchify on the GPU (perf-notes attempt 44): torch's strided copy beside our Triton kernel, and
the token assembly (position add) after the patch GEMM, each timed in CUDA graphs.

    python3 tools/patchify_probe.py [MODEL:BATCH ...]
"""
import sys

import torch

from engine.compile import graphed_ms
from modeling import ops
from modeling.config import vit_config

dev = torch.device("cuda")
specs = [a.split(":") for a in sys.argv[1:]] or [
    ("vit_base_patch16_224", 1), ("vit_base_patch16_224", 64), ("vit_base_patch16_224", 256),
    ("vit_large_patch16_384", 1), ("vit_large_patch16_384", 256)]


def timed(fn):
    return graphed_ms(fn, dev, budget_s=0.3)


for name, batch in specs:
    batch = int(batch)
    cfg = vit_config(name, "ait")
    images = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=dev, dtype=torch.float16)
    out = torch.empty(batch * cfg.num_patches, cfg.patch_dim, device=dev, dtype=torch.float16)
    tokens = torch.randn(batch * cfg.num_patches, cfg.embed_dim, device=dev, dtype=torch.float16)
    pos = torch.randn(cfg.num_patches, cfg.embed_dim, device=dev, dtype=torch.float16)
    prefix = torch.zeros(0, cfg.embed_dim, device=dev, dtype=torch.float16)
    x = torch.empty_like(tokens)
    floor_us = 2 * images.numel() * 2 / 3.0e12 * 1e6  # read + write at 3.0 TB/s
    same = torch.equal(ops.patchify(images, cfg.patch_size, out.clone(), "triton"), ops.patchify(images, cfg.patch_size))
    t_torch = timed(lambda: ops.patchify(images, cfg.patch_size, out))
    t_triton = timed(lambda: ops.patchify(images, cfg.patch_size, out, "triton"))
    t_assemble = timed(lambda: ops.assemble_tokens(tokens, pos, prefix, batch, out=x))
    t_assemble_triton = timed(lambda: ops.assemble_tokens(tokens, pos, prefix, batch, out=x, impl="triton"))
    same_tokens = torch.equal(ops.assemble_tokens(tokens, pos, prefix, batch, impl="triton"),
                              ops.assemble_tokens(tokens, pos, prefix, batch))
    print(f"{name} batch {batch}: patchify torch {t_torch * 1e3:7.1f} us, triton {t_triton * 1e3:7.1f} us "
          f"(copy floor {floor_us:6.1f} us, equal {same}); token assembly torch {t_assemble * 1e3:7.1f} us, "
          f"triton {t_assemble_triton * 1e3:7.1f} us (copy floor {2 * tokens.numel() * 2 / 3.0e12 * 1e6:6.1f} us, "
          f"equal {same_tokens})", flush=True)
