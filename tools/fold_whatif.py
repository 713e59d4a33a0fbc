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

import modeling  # noqa: F401
from modeling import ops, vision_transformer as vt
from norm_whatif import row_stats
from power_probe import whatif_cli, whatif_forwards
import wgmma_gemm as wg

SCHEDULE, CLUSTER = os.environ.get("WGMMA_VARIANT", "coop:2").split(":")
OURS = dict(cluster=int(CLUSTER), schedule=SCHEDULE)


def folded(norm, linear):
    """(W2, b2, W2 s) for LayerNorm `norm` (its shift s) folded into `linear`."""
    w2, b2 = wg.fold_layer_norm(norm.weight, norm.bias, linear.weight, linear.bias)
    return w2, b2, (w2.double() @ norm.shift.double()).float()


def fold_blocks(model):
    """{id(block): its folded qkv and fc1 (W2, b2, W2 s), and their float32 biases for the swaps alone}."""
    return {id(b): {"qkv": folded(b.norm1, b.qkv), "fc1": folded(b.norm2, b.fc1),
                    "qkv bias": b.qkv.bias.float().contiguous(), "fc1 bias": b.fc1.bias.float().contiguous()}
            for b in model.blocks}


def block_forward(fold1, fold2, swap_qkv, swap_fc1, folds, rstd):
    """Block.forward with norm1 / norm2 folded into qkv / fc1, or only those GEMMs swapped for ours."""
    def forward(self, x, batch, plan, arena=None):
        d, inner, f = x.shape[1], self.heads * self.head_dim, folds[id(self)]
        wide = vt._slot(arena, "wide", 3 * inner)
        if fold1:
            row_stats(x, rstd, self.norm1.eps, self.norm1.shift)
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
            row_stats(x, rstd, self.norm2.eps, self.norm2.shift)
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
        folds = fold_blocks(model)
        swapped = {label: partial(mock.patch.object, vt.Block, "forward", block_forward(*flags, folds, rstd))
                   for label, *flags in VARIANTS}
        return {"plan": nullcontext, **swapped}  # (the closures hold the folded weights)
    whatif_forwards(spec, rounds, variants)


if __name__ == "__main__":
    whatif_cli(main, __doc__)
