"""What could folding LayerNorm into its neighbours save? (perf-notes attempt 59.) Whole ViT forwards,
sustained at the power cap, with the measured plan and with one LayerNorm of every block either
removed (the next GEMM reads the residual stream as it is) or replaced by a statistics-only pass
(reads the rows, writes a mean and a reciprocal std per row: what a fold into the next kernel
still needs). The logits of the altered forwards are wrong by design; only their time and energy
mean anything, as upper bounds for a fold whose consumer absorbs the normalization for free.

    python3 tools/norm_whatif.py MODEL:BATCH [ROUNDS]
"""
from contextlib import nullcontext
from functools import partial
from unittest import mock

import torch
import triton
import triton.language as tl

import modeling  # noqa: F401
from modeling import ops, vision_transformer as vt
from power_probe import whatif_cli, whatif_forwards


@triton.jit
def _row_stats_kernel(X, S, MEAN, RSTD, n_rows, n_cols, stride_x, eps, HAS_SHIFT: tl.constexpr, HAS_MEAN: tl.constexpr,
                      ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x += tl.load(S + cols, mask=cols < n_cols, other=0.0)[None, :]
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    if HAS_MEAN:
        tl.store(MEAN + rows, mean, mask=rows < n_rows)
    tl.store(RSTD + rows, tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps), mask=rows < n_rows)


def row_stats(x, rstd, eps=1e-6, shift=None, mean=None):
    """rstd[i] = 1 / sqrt(var(x[i] + shift) + eps), float32, and mean[i] (of x[i] + shift) where given."""
    n_rows, n_cols = x.shape
    _row_stats_kernel[(triton.cdiv(n_rows, 4),)](x, x if shift is None else shift, rstd if mean is None else mean, rstd,
                                                  n_rows, n_cols, x.stride(0), eps, HAS_SHIFT=shift is not None,
                                                  HAS_MEAN=mean is not None, ROWS=4,
                                                  BLOCK=triton.next_power_of_2(n_cols), num_warps=4)


def block_forward(which: str, mode: str, stats):
    """Block.forward with norm `which` ("1", "2" or "both") removed ("skip") or replaced by row
    statistics ("stats")."""
    def forward(self, x, batch, plan, arena=None):
        d, inner = x.shape[1], self.heads * self.head_dim

        def norm(module, index):
            if which not in ("both", index):
                return module(x, plan, out=vt._slot(arena, "narrow", d))
            if mode == "stats":
                row_stats(x, stats[1], mean=stats[0])
            return x
        qkv = self.qkv(norm(self.norm1, "1"), plan, out=vt._slot(arena, "wide", 3 * inner))
        attn = ops.attention(qkv, batch, self.heads, self.head_dim, plan.attention, plan.attention_tile,
                             out=vt._slot(arena, "narrow", inner))
        x = self.proj(attn, plan, residual=x)
        hidden = self.fc1(norm(self.norm2, "2"), plan, out=vt._slot(arena, "wide", self.fc1.weight.shape[0]))
        return self.fc2(hidden, plan, residual=x)
    return forward


WHATIFS = [("norm1 stats only", "1", "stats"), ("norm1 removed", "1", "skip"), ("norm2 stats only", "2", "stats"),
           ("both stats only", "both", "stats")]  # label, which norm, how


def main(spec, rounds=3):
    def variants(model, plan, images, arena):
        stats = torch.empty(2, arena.rows, device=images.device, dtype=torch.float32)  # mean, 1/std
        swapped = {label: partial(mock.patch.object, vt.Block, "forward", block_forward(which, mode, stats))
                   for label, which, mode in WHATIFS}
        return {"plan": nullcontext, **swapped}
    whatif_forwards(spec, rounds, variants)


if __name__ == "__main__":
    whatif_cli(main, __doc__)
