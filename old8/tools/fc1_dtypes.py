"""fc1 + GELU at one model's batch-1 shape in float16 and bfloat16: cuBLASLt's GELU epilogue, cuBLAS
bias-only, cuBLAS + a separate GELU, and our GEMM's tiles, timed in CUDA graphs as the plan does.

    python3 tools/fc1_dtypes.py [MODEL] [BATCH]
"""
import sys

import torch
import torch.nn.functional as F

from engine.compile import _graphed
from engine.timing import measure
from modeling import kernels, ops
from modeling.config import vit_config

dev = torch.device("cuda")
cfg = vit_config(sys.argv[1] if len(sys.argv) > 1 else "vit_large_patch16_384", "ait")
rows = (int(sys.argv[2]) if len(sys.argv) > 2 else 1) * cfg.seq_len
for dtype in (torch.float16, torch.bfloat16):
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(rows, cfg.embed_dim, device=dev, generator=g).to(dtype)
    w = (torch.randn(cfg.mlp_hidden, cfg.embed_dim, device=dev, generator=g) / cfg.embed_dim ** 0.5).to(dtype)
    b = torch.randn(cfg.mlp_hidden, device=dev, generator=g).to(dtype)
    runs = {"cublasLt gelu epilogue": lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True),
            "cublas bias only": lambda: F.linear(x, w, b),
            "cublas + separate gelu": lambda: F.gelu(F.linear(x, w, b), approximate="tanh")}
    runs.update({f"ours {t}": (lambda t=t: ops.linear_gelu(x, w, b, "gelu", "triton", t))
                 for t in kernels.GEMM_TILE_CANDIDATES})
    for name, fn in runs.items():
        try:
            ms = measure(_graphed(fn, 5), dev, warmup_s=0.05, min_iters=10, max_iters=400, budget_s=0.3).median_ms / 5
            print(f"{cfg.model_name} rows {rows} {str(dtype)[6:]:9s} {name:28s} {ms * 1e3:7.1f} us")
        except Exception as e:  # noqa: BLE001
            print(f"{cfg.model_name} rows {rows} {str(dtype)[6:]:9s} {name:28s} {type(e).__name__}: {str(e)[:80]}")
    sys.stdout.flush()
