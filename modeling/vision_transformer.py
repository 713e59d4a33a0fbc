"""Vision Transformer written in a fused-op style, after AITemplate's example.

Each module holds the engine's converted weights (weight_utils.py makes them from a TIMM
state dict) and calls the ops in ops.py: a Linear with a specialization ("gelu" runs the
activation in the GEMM's epilogue, "residual" accumulates into the residual stream in
place), attention on the fused QKV output, and LayerNorm that adds the deferred biases on
load. `plan` picks each op's implementation; the default plan is the plain-PyTorch reference.

Shapes: tokens travel as a 2-D (batch * tokens, dim) tensor from the patch GEMM to the
pooling, so every GEMM is one large cuBLAS call and no layout copy happens between them.
"""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from . import ops
from .config import ViTConfig


def _aligned(nbytes: int) -> int:
    """nbytes rounded up to 256: every view carved from one allocation starts TMA-aligned."""
    return -(-nbytes // 256) * 256


def _buffers(module: nn.Module, **tensors):
    for name, t in tensors.items():
        module.register_buffer(name, t)


class LayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float, shift: bool = False):
        super().__init__()
        self.eps = eps
        _buffers(self, weight=torch.ones(dim), bias=torch.zeros(dim))
        self.register_buffer("shift", torch.zeros(dim) if shift else None)

    def forward(self, x, plan: ops.Plan, out=None):
        return ops.layer_norm(x, self.weight, self.bias, self.eps, self.shift, plan.norm, out=out, tile=plan.norm_tile)


class Linear(nn.Module):
    """y = x @ W.T (+ b), with AITemplate-style specializations:
    "" plain; "gelu" bias + GELU; "residual" x_res += a @ W.T (bias deferred to the next shift)."""

    def __init__(self, in_features: int, out_features: int, specialization: str = "", act: str = "gelu",
                 bias: bool = True, site: str = ""):
        super().__init__()
        self.specialization, self.act = specialization, act
        self.tile_field = f"{site}_tile" if site else ""  # the plan field naming this GEMM's Triton tile
        _buffers(self, weight=torch.zeros(out_features, in_features))
        has_bias = bias and specialization != "residual"
        self.register_buffer("bias", torch.zeros(out_features) if has_bias else None)

    def forward(self, x, plan: ops.Plan, residual=None, out=None):
        tile = getattr(plan, self.tile_field) if self.tile_field else ""
        if self.specialization == "gelu":
            return ops.linear_gelu(x, self.weight, self.bias, self.act, plan.mlp_act, tile, out=out)
        if self.specialization == "residual":
            return ops.residual_linear(residual, x, self.weight, plan.residual, tile)
        return ops.linear(x, self.weight, self.bias, tile, out=out)


class Block(nn.Module):
    """Pre-norm transformer block: x += proj(attn(qkv(norm1(x)))); x += fc2(gelu(fc1(norm2(x))))."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        d, a = cfg.embed_dim, cfg.num_heads * cfg.head_dim
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.norm1 = LayerNorm(d, cfg.norm_eps, shift=True)
        self.qkv = Linear(d, 3 * a, site="qkv")
        self.proj = Linear(a, d, "residual", site="proj")
        self.norm2 = LayerNorm(d, cfg.norm_eps, shift=True)
        self.fc1 = Linear(d, cfg.mlp_hidden, "gelu", cfg.act, site="fc1")
        self.fc2 = Linear(cfg.mlp_hidden, d, "residual", site="fc2")

    def forward(self, x, batch: int, plan: ops.Plan, arena: "ActivationArena | None" = None):
        d, inner = x.shape[1], self.heads * self.head_dim
        normed = self.norm1(x, plan, out=_slot(arena, "narrow", d))
        qkv = self.qkv(normed, plan, out=_slot(arena, "wide", 3 * inner))
        attn = ops.attention(qkv, batch, self.heads, self.head_dim, plan.attention, plan.attention_tile,
                             out=_slot(arena, "narrow", inner))
        x = self.proj(attn, plan, residual=x)
        normed = self.norm2(x, plan, out=_slot(arena, "narrow", d))
        hidden = self.fc1(normed, plan, out=_slot(arena, "wide", self.fc1.weight.shape[0]))
        return self.fc2(hidden, plan, residual=x)


class ActivationArena:
    """The forward's activations for one batch size in one allocation (AITemplate's memory
    planning, done by hand). Three slots serve every op: `x`, the residual stream; `narrow`, the
    (tokens, dim) outputs (LayerNorm, attention, patch embedding); `wide`, the QKV and fc1 outputs
    and the patchified images. Each op writes to a slot whose contents are dead by then, so a
    CUDA graph captured with an arena takes no allocator segments for activations: a graph's
    private pool gives each 1-10 MiB tensor a 20 MiB segment (docs/perf-notes.md, attempt 15).
    One arena per compiled engine: two engines sharing one would race on concurrent streams."""

    def __init__(self, cfg: ViTConfig, batch: int, dtype: torch.dtype, device):
        self.rows = batch * cfg.seq_len
        inner = cfg.num_heads * cfg.head_dim
        self.dtype = dtype
        sizes = {"x": self.rows * cfg.embed_dim, "narrow": self.rows * max(cfg.embed_dim, inner),
                 "wide": max(self.rows * max(3 * inner, cfg.mlp_hidden), batch * cfg.num_patches * cfg.patch_dim)}
        self.offsets, total = {}, 0
        for name, n in sizes.items():
            self.offsets[name] = total
            total += _aligned(n * dtype.itemsize)
        # the caching allocator serves a 1-10 MiB request from a 20 MiB segment, 10 MiB and up exactly
        if 2**20 < total < 10 * 2**20:
            total = 10 * 2**20
        self.buffer = torch.empty(total, dtype=torch.uint8, device=device)

    def take(self, slot: str, cols: int, rows: int | None = None) -> torch.Tensor:
        """A (rows, cols) view of one slot (rows: every token of the batch unless given)."""
        rows = rows or self.rows
        return self.buffer[self.offsets[slot]:].view(self.dtype)[:rows * cols].view(rows, cols)


def _slot(arena: ActivationArena | None, slot: str, cols: int, rows: int | None = None):
    """Where the arena wants an op's output; None (a fresh tensor) without an arena."""
    return None if arena is None else arena.take(slot, cols, rows)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = Linear(cfg.patch_dim, d, bias=False)  # its bias lives in pos_patch
        # position table for patch tokens (patch bias folded in) and the ready prefix tokens
        _buffers(self, pos_patch=torch.zeros(cfg.num_patches, d),
                 prefix=torch.zeros(cfg.num_prefix_tokens, d))
        self.norm_pre = LayerNorm(d, cfg.norm_eps) if cfg.pre_norm else None
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        _buffers(self, final_shift=torch.zeros(d))
        # one LayerNorm at the end: per token (TIMM's `norm`) or after pooling (`fc_norm`)
        self.norm = LayerNorm(d, cfg.norm_eps) if cfg.final_norm or cfg.fc_norm else None
        self.head = Linear(d, cfg.num_classes) if cfg.num_classes else None
        self.plan = ops.Plan()
        self.requires_grad_(False)

    def set_plan(self, plan: ops.Plan) -> "VisionTransformer":
        self.plan = plan
        return self

    def embed(self, images: torch.Tensor, arena: ActivationArena | None = None) -> torch.Tensor:
        cfg, d = self.cfg, self.cfg.embed_dim
        patch_rows = images.shape[0] * cfg.num_patches
        patches = ops.patchify(images, cfg.patch_size, out=_slot(arena, "wide", cfg.patch_dim, patch_rows),
                               impl=self.plan.embed)
        tokens = self.patch_embed(patches, self.plan, out=_slot(arena, "narrow", d, patch_rows))
        x = ops.assemble_tokens(tokens, self.pos_patch, self.prefix, images.shape[0], out=_slot(arena, "x", d),
                                impl=self.plan.embed)
        if self.norm_pre is not None:
            x = self.norm_pre(x, self.plan, out=x if arena is not None else None)  # in place in the arena
        return x

    def pool(self, x: torch.Tensor, batch: int, arena: ActivationArena | None = None) -> torch.Tensor:
        cfg, plan = self.cfg, self.plan
        tokens = x.view(batch, cfg.seq_len, cfg.embed_dim)
        if cfg.final_norm and cfg.global_pool != "token":
            # a per-token norm before a reduction: normalize every token, then pool
            normed = ops.layer_norm(x, self.norm.weight, self.norm.bias, self.norm.eps, self.final_shift, plan.norm,
                                    out=_slot(arena, "narrow", cfg.embed_dim), tile=plan.norm_tile)
            return ops.pool_tokens(normed.view_as(tokens), cfg.global_pool, cfg.num_prefix_tokens,
                                   cfg.pool_include_prefix)
        pooled = ops.pool_tokens(tokens, cfg.global_pool, cfg.num_prefix_tokens, cfg.pool_include_prefix)
        if self.norm is not None:  # fc_norm, or a per-token norm of the one pooled class token
            return ops.layer_norm(pooled, self.norm.weight, self.norm.bias, self.norm.eps, self.final_shift,
                                  plan.norm)
        return pooled + self.final_shift.to(pooled.dtype)

    def forward(self, images: torch.Tensor, arena: ActivationArena | None = None) -> torch.Tensor:
        """Logits (or pooled features) of a batch; with an `arena` (made for this batch size, dtype
        and device) the activations live in it instead of fresh allocations."""
        batch = images.shape[0]
        if arena is not None and arena.rows != batch * self.cfg.seq_len:
            raise ValueError(f"the activation arena was made for {arena.rows // self.cfg.seq_len} images, given {batch}")
        with ops.sdpa_backend(self.plan.attention):
            x = self.embed(images, arena)
            for block in self.blocks:
                x = block(x, batch, self.plan, arena)
            pooled = self.pool(x, batch, arena)
            return self.head(pooled, self.plan) if self.head is not None else pooled

    def pack_to(self, device) -> "VisionTransformer":
        """Move every weight to `device` inside one allocation (256-byte aligned views). Weights
        loaded one by one leave half-used allocator segments between them, which a CUDA graph's
        private pool cannot use: one exact block keeps the engine's reserved memory low at small
        batch (docs/perf-notes.md, attempt 13)."""
        owners = [(m, n, t) for m in self.modules() for n, t in m._buffers.items() if t is not None]
        nbytes = [t.numel() * t.element_size() for _, _, t in owners]
        starts = [0]
        for n in nbytes:
            starts.append(starts[-1] + _aligned(n))
        flat = torch.empty(starts[-1], dtype=torch.uint8)
        for (_, _, t), start, n in zip(owners, starts, nbytes):
            flat[start:start + n] = t.detach().contiguous().view(-1).view(torch.uint8)
        flat = flat.to(device)
        for (module, name, t), start, n in zip(owners, starts, nbytes):
            module._buffers[name] = flat[start:start + n].view(t.dtype).view(t.shape)
        return self

    def load_engine_state(self, state: Dict[str, torch.Tensor]) -> "VisionTransformer":
        """Load converted weights, keeping each tensor's own dtype (norm params stay float32)."""
        own = dict(self.named_buffers())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"engine weights do not fit {self.cfg.model_name}: "
                             f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        for name, tensor in state.items():
            if tuple(own[name].shape) != tuple(tensor.shape):
                raise ValueError(f"engine weight {name}: shape {tuple(tensor.shape)}, "
                                 f"{self.cfg.model_name} needs {tuple(own[name].shape)}")
            module_name, _, attr = name.rpartition(".")
            module = self.get_submodule(module_name) if module_name else self
            module.register_buffer(attr, tensor)
        return self
