"""LayerNorm folded into the GEMM after it, in whole forwards, with our GEMM (tools/wgmma_gemm.py; perf-notes
attempts 59, 67-69). Each fold replaces a block's LayerNorm and the normalized copy it writes by a pass that
reads the residual stream and writes one float a token, 1/std; the next GEMM reads the raw stream:

    LN(x + s) W^T + b = rstd * (x W2^T + W2 s) + b2,   W2 = W diag(gamma) less each row's mean, b2 = W beta + b

(s: the deferred biases the engine adds on LayerNorm's load). Variants, each a CUDA graph of the measured
plan's forward, sustained at the power cap in alternation with the plan itself: our GEMM in place of
cuBLAS at qkv or fc1 (what the swap alone costs), then norm1, norm2 and both folded. Unlike the other
what-ifs these forwards are meant to be right: each one's logits are compared with the plan's.

    [WGMMA_VARIANT=SCHEDULE:CLUSTER] python3 tools/fold_whatif.py MODEL:BATCH [ROUNDS]

(our GEMM's variant: default coop:2; `tools/wgmma_gemm.py` prints the one with the least energy.)
"""
import os
from contextlib import nullcontext
from functools import partial
from unittest import mock

import torch
import triton
import triton.language as tl

import modeling  # noqa: F401
from modeling import ops, vision_transformer as vt
from power_probe import whatif_cli, whatif_forwards
import wgmma_gemm as wg

SCHEDULE, CLUSTER = os.environ.get("WGMMA_VARIANT", "coop:2").split(":")
OURS = dict(cluster=int(CLUSTER), schedule=SCHEDULE)


@triton.jit
def _row_rstd_kernel(X, S, RSTD, n_rows, n_cols, stride_x, eps, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x += tl.load(S + cols, mask=cols < n_cols, other=0.0)[None, :]
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    tl.store(RSTD + rows, tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps), mask=rows < n_rows)


def row_rstd(x, shift, rstd, eps):
    """rstd[i] = 1 / sqrt(var(x[i] + shift) + eps), float32."""
    n_rows, n_cols = x.shape
    _row_rstd_kernel[(triton.cdiv(n_rows, 4),)](x, shift, rstd, n_rows, n_cols, x.stride(0), eps, ROWS=4,
                                                BLOCK=triton.next_power_of_2(n_cols), num_warps=4)


def folded(norm, linear):
    """(W2, b2, W2 s) for LayerNorm `norm` (its shift s) folded into `linear`."""
    w2, b2 = wg.fold_layer_norm(norm.weight, norm.bias, linear.weight, linear.bias)
    return w2, b2, (w2.double() @ norm.shift.double()).float()


def block_forward(fold1, fold2, swap_qkv, swap_fc1, folds, rstd):
    """Block.forward with norm1 / norm2 folded into qkv / fc1, or only those GEMMs swapped for ours."""
    def forward(self, x, batch, plan, arena=None):
        d, inner, f = x.shape[1], self.heads * self.head_dim, folds[id(self)]
        wide = vt._slot(arena, "wide", 3 * inner)
        if fold1:
            row_rstd(x, self.norm1.shift, rstd, self.norm1.eps)
            qkv = wg.scaled_gemm(x, *f["qkv"][:2], rstd, False, wide, shift=f["qkv"][2], **OURS)
        else:
            normed = self.norm1(x, plan, out=vt._slot(arena, "narrow", d))
            qkv = wg.scaled_gemm(normed, self.qkv.weight, f["qkv bias"], out=wide, **OURS) if swap_qkv \
                else self.qkv(normed, plan, out=wide)
        attn = ops.attention(qkv, batch, self.heads, self.head_dim, plan.attention, plan.attention_tile,
                             out=vt._slot(arena, "narrow", inner))
        x = self.proj(attn, plan, residual=x)
        wide = vt._slot(arena, "wide", self.fc1.weight.shape[0])
        if fold2:
            row_rstd(x, self.norm2.shift, rstd, self.norm2.eps)
            hidden = wg.scaled_gemm(x, *f["fc1"][:2], rstd, True, wide, shift=f["fc1"][2], **OURS)
        else:
            normed = self.norm2(x, plan, out=vt._slot(arena, "narrow", d))
            hidden = wg.scaled_gemm(normed, self.fc1.weight, f["fc1 bias"], None, True, wide, **OURS) if swap_fc1 \
                else self.fc1(normed, plan, out=wide)
        return self.fc2(hidden, plan, residual=x)
    return forward


VARIANTS = [("qkv by our GEMM", False, False, True, False), ("fc1 by our GEMM", False, False, False, True),
            ("norm1 folded into qkv", True, False, False, False), ("norm2 folded into fc1", False, True, False, False),
            ("both folded", True, True, False, False)]  # label, fold1, fold2, swap qkv, swap fc1


def main(spec, rounds=3):
    def variants(model, plan, images, arena):
        print(f"our GEMM: {SCHEDULE}, cluster {CLUSTER}", flush=True)
        if plan.mlp_act != "epilogue" and any(v[2] or v[4] for v in VARIANTS):
            print(f"note: the plan's fc1 GELU is {plan.mlp_act!r}; ours is GELU(tanh) in the epilogue", flush=True)
        rstd = torch.empty(arena.rows, device=images.device, dtype=torch.float32)
        folds = {id(b): {"qkv": folded(b.norm1, b.qkv), "fc1": folded(b.norm2, b.fc1),
                         "qkv bias": b.qkv.bias.float().contiguous(), "fc1 bias": b.fc1.bias.float().contiguous()}
                 for b in model.blocks}
        swapped = {label: partial(mock.patch.object, vt.Block, "forward", block_forward(*flags, folds, rstd))
                   for label, *flags in VARIANTS}
        return {"plan": nullcontext, **swapped}  # (the closures hold the folded weights)
    whatif_forwards(spec, rounds, variants)


if __name__ == "__main__":
    whatif_cli(main, __doc__)
