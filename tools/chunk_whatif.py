"""Would running a block's halves on a few images at a time, so that their intermediates stay in L2,
pay at large batch? (perf-notes attempt 62.) At ViT-B/16 batch 256 the QKV GEMM writes 231 MB per
layer and the attention reads it back, far more than the H100's 50 MB L2. Here each half-block
(norm1, qkv, attention, proj; or norm2, fc1, fc2) runs on CHUNK images at a time, through one
scratch buffer per intermediate whose first rows every chunk reuses, so the next chunk's writes land
on lines still in L2. Same math per image as the plan (its logits are compared), smaller GEMMs (their
last wave fills fewer SMs) and more launches. Whole forwards, sustained at the power cap, alternating.

    python3 tools/chunk_whatif.py MODEL:BATCH [ROUNDS]
"""
from contextlib import nullcontext
from dataclasses import replace
from functools import partial
from unittest import mock

import torch

import modeling  # noqa: F401
from modeling import ops, vision_transformer as vt
from power_probe import whatif_cli, whatif_forwards


def chunked_block(chunk: int, halves: str, scratch: dict, chunk_plan):
    """Block.forward with the attention half ("attn"), the MLP half ("mlp") or both ("both") run on
    `chunk` images at a time with `chunk_plan`, the other half as the engine runs it."""
    def forward(self, x, batch, plan, arena=None):
        d, inner, tokens = x.shape[1], self.heads * self.head_dim, x.shape[0] // batch

        def attention_half(xs, n, p, slot):
            normed = self.norm1(xs, p, out=slot("narrow", d))
            qkv = self.qkv(normed, p, out=slot("wide", 3 * inner))
            attn = ops.attention(qkv, n, self.heads, self.head_dim, p.attention, p.attention_tile,
                                 out=slot("attn", inner))
            return self.proj(attn, p, residual=xs)

        def mlp_half(xs, n, p, slot):
            normed = self.norm2(xs, p, out=slot("narrow", d))
            hidden = self.fc1(normed, p, out=slot("wide", self.fc1.weight.shape[0]))
            return self.fc2(hidden, p, residual=xs)

        for name, half in (("attn", attention_half), ("mlp", mlp_half)):
            if halves not in (name, "both"):  # the arena's slots; its attention output goes to "narrow"
                x = half(x, batch, plan, lambda slot, cols: vt._slot(arena, slot.replace("attn", "narrow"), cols))
                continue
            for start in range(0, batch, chunk):
                n = min(chunk, batch - start)
                rows = n * tokens
                xs = x[start * tokens:start * tokens + rows]
                done = half(xs, n, chunk_plan, lambda slot, cols, rows=rows: scratch[slot][:rows * cols].view(rows, cols))
                if done is not xs:  # the reference plan adds out of place
                    xs.copy_(done)
        return x
    return forward


def main(spec, rounds=3):
    def variants(model, plan, images, arena):
        dev, dtype, cfg = images.device, images.dtype, model.cfg
        wide = max(3 * cfg.num_heads * cfg.head_dim, cfg.mlp_hidden)
        chunk_rows = 64 * cfg.seq_len  # the largest chunk below
        scratch = {name: torch.empty(chunk_rows * cols, device=dev, dtype=dtype)
                   for name, cols in (("narrow", cfg.embed_dim), ("wide", wide), ("attn", cfg.embed_dim))}
        # the plan's GEMM names are for the whole batch's rows; cuBLASLt's heuristic numbers ("lt3") and
        # explicit configurations may not fit a chunk's, so a chunk uses torch's cuBLAS call there
        lt_free = replace(plan, **{f"{site}_tile": "" for site in ("qkv", "fc1", "proj", "fc2")
                                   if ops.lt_algorithm(getattr(plan, f"{site}_tile")) is not None})

        def chunked(halves, chunk):
            return partial(mock.patch.object, vt.Block, "forward", chunked_block(chunk, halves, scratch, lt_free))
        # "no cuBLASLt picks": the whole batch with the chunks' GEMM calls, to tell their cost from the chunking's
        return {"plan": nullcontext, "plan, no cuBLASLt picks": partial(mock.patch.object, model, "plan", lt_free),
                **{f"{halves} half, {c} images at a time": chunked(halves, c)
                   for halves, c in (("attn", 64), ("attn", 32), ("attn", 16), ("mlp", 16), ("both", 32))}}
    whatif_forwards(spec, rounds, variants)


if __name__ == "__main__":
    whatif_cli(main, __doc__)
