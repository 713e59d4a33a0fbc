"""The one table of ViT configurations: read from TIMM, checked, used by every script.

`vit_config(name)` builds TIMM's model on the meta device (no memory, no weights), reads
every field the engine needs off its modules, and refuses, in one line and before any
work, anything the engine does not implement.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import nn


class UnsupportedModel(ValueError):
    """A TIMM name this engine cannot run; the message is one line for the user."""


# The original example benchmarked ViTs without a class token, average-pooled.
# `--variant ait` selects that; `--variant timm` keeps TIMM's own configuration.
VARIANTS = {
    "timm": {},
    "ait": {"class_token": False, "global_pool": "avg"},
}

SUPPORTED_POOLS = ("token", "avg", "max", "avgmax")


@dataclass(frozen=True)
class ViTConfig:
    model_name: str
    variant: str
    img_size: Tuple[int, int]
    patch_size: Tuple[int, int]
    in_chans: int
    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    mlp_hidden: int
    num_classes: int         # 0: no head, the engine returns the pooled features (e.g. DINOv2)
    qkv_bias: bool
    proj_bias: bool          # bias on attn.proj, mlp.fc1 and mlp.fc2
    patch_bias: bool
    class_token: bool
    reg_tokens: int
    pos_embed: bool
    no_embed_class: bool     # position embedding covers patches only
    pre_norm: bool
    final_norm: bool         # per-token norm after the last block
    fc_norm: bool            # norm after pooling
    global_pool: str
    pool_include_prefix: bool
    layer_scale: bool
    act: str                 # "gelu" (erf) or "gelu_tanh"
    norm_eps: float
    overrides: Tuple[Tuple[str, object], ...] = ()   # extra TIMM kwargs this config was built with

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def seq_len(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    @property
    def patch_dim(self) -> int:
        return self.in_chans * self.patch_size[0] * self.patch_size[1]

    def flops(self, batch: int) -> float:
        """Matmul FLOPs of one forward (2 per multiply-add); elementwise work is not counted."""
        d, n, a = self.embed_dim, self.seq_len, self.num_heads * self.head_dim
        per_block = 2 * n * (d * 3 * a + a * d + 2 * d * self.mlp_hidden) + 2 * 2 * n * n * a
        embed = 2 * self.num_patches * self.patch_dim * d
        head = 2 * d * self.num_classes
        return float(batch) * (embed + self.depth * per_block + head)

    def num_params(self) -> int:
        d, a, h = self.embed_dim, self.num_heads * self.head_dim, self.mlp_hidden
        block = d * 3 * a + a * d + 2 * d * h + 4 * d + 3 * a + 2 * d + h
        return (self.depth * block + self.patch_dim * d + self.seq_len * d
                + d * self.num_classes + self.num_classes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @staticmethod
    def from_json(text: str) -> "ViTConfig":
        fields = json.loads(text)
        for key in ("img_size", "patch_size"):
            fields[key] = tuple(fields[key])
        fields["overrides"] = tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in fields["overrides"])
        return ViTConfig(**fields)

    def timm_model(self, device="cpu") -> nn.Module:
        """TIMM's own model for this configuration (randomly initialised by TIMM)."""
        return create_timm_model(self.model_name, self.variant, device=device, **dict(self.overrides))


def timm_vit_names():
    import timm
    return timm.list_models(module="vision_transformer")


def create_timm_model(name: str, variant: str = "timm", device="cpu", **kwargs) -> nn.Module:
    """TIMM's own model for `name`, with the variant's overrides, never downloading."""
    import timm
    if variant not in VARIANTS:
        raise UnsupportedModel(f"unknown variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm_vit_names(), n=3, cutoff=0.5)
        hint = f"; closest TIMM ViT names: {', '.join(close)}" if close else ""
        raise UnsupportedModel(f"unknown model {name!r}{hint}")
    with torch.device(device):
        return timm.create_model(name, pretrained=False, **VARIANTS[variant], **kwargs)


def _unsupported(name: str, what: str) -> UnsupportedModel:
    return UnsupportedModel(f"{name}: unsupported by this engine: {what}")


def _act_name(act: nn.Module, name: str) -> str:
    if isinstance(act, nn.GELU):
        return "gelu" if act.approximate == "none" else "gelu_tanh"
    if type(act).__name__ == "GELUTanh":
        return "gelu_tanh"
    if type(act).__name__ == "GELU":  # timm.layers.GELU: exact erf GELU
        return "gelu"
    raise _unsupported(name, f"activation {type(act).__name__}")


def config_from_timm_model(model: nn.Module, name: str, variant: str, overrides=()) -> ViTConfig:
    """Read the engine configuration off a TIMM VisionTransformer, refusing what we lack."""
    from timm.layers import Mlp, PatchEmbed
    from timm.models import vision_transformer as tvit
    Attention, Block, VisionTransformer = tvit.Attention, tvit.Block, tvit.VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise _unsupported(name, f"model class {type(model).__name__} (need VisionTransformer)")
    if model.global_pool not in SUPPORTED_POOLS:
        raise _unsupported(name, f"global_pool={model.global_pool!r} (supported: {', '.join(SUPPORTED_POOLS)})")
    if model.attn_pool is not None:
        raise _unsupported(name, "attention pooling")
    if getattr(model, "dynamic_img_size", False):
        raise _unsupported(name, "dynamic_img_size")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or not isinstance(pe.proj, nn.Conv2d):
        raise _unsupported(name, f"patch embedding {type(pe).__name__}")
    if not isinstance(pe.norm, nn.Identity):
        raise _unsupported(name, "normalized patch embedding")
    if tuple(pe.proj.stride) != tuple(pe.proj.kernel_size) or pe.proj.padding not in ((0, 0), 0):
        raise _unsupported(name, "overlapping or padded patch embedding")
    if not getattr(pe, "flatten", True) or getattr(pe, "dynamic_img_pad", False):
        raise _unsupported(name, "dynamic image padding")
    if any(s % p for s, p in zip(pe.img_size, pe.patch_size)):
        raise _unsupported(name, f"image size {pe.img_size[0]}x{pe.img_size[1]} not a multiple of the patch "
                                 f"size {pe.patch_size[0]}x{pe.patch_size[1]} (TIMM crops the border)")

    norms = []
    acts = set()
    for i, blk in enumerate(model.blocks):
        where = f"block {i}"
        if type(blk) is not Block:
            raise _unsupported(name, f"{where}: block type {type(blk).__name__} (need the pre-norm Block)")
        attn, mlp = blk.attn, blk.mlp
        if type(attn) is not Attention:
            raise _unsupported(name, f"{where}: attention type {type(attn).__name__}")
        if not isinstance(attn.q_norm, nn.Identity) or not isinstance(attn.k_norm, nn.Identity):
            raise _unsupported(name, f"{where}: qk_norm")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise _unsupported(name, f"{where}: attention output norm (scale_attn_norm)")
        if getattr(attn, "gate", None) is not None:
            raise _unsupported(name, f"{where}: gated attention")
        if type(mlp) is not Mlp:
            raise _unsupported(name, f"{where}: MLP type {type(mlp).__name__}")
        if not isinstance(mlp.norm, nn.Identity):
            raise _unsupported(name, f"{where}: MLP norm (scale_mlp_norm)")
        if (mlp.fc1.bias is None) != (mlp.fc2.bias is None) or (mlp.fc2.bias is None) != (attn.proj.bias is None):
            raise _unsupported(name, f"{where}: mixed projection biases")
        acts.add(_act_name(mlp.act, name))
        norms += [blk.norm1, blk.norm2]
    for extra in (model.norm_pre, model.norm, model.fc_norm):
        if not isinstance(extra, nn.Identity):
            norms.append(extra)
    for norm in norms:
        if not isinstance(norm, nn.LayerNorm) or not norm.elementwise_affine or norm.bias is None:
            raise _unsupported(name, f"normalization {type(norm).__name__} (need LayerNorm with affine and bias)")
    eps = {float(n.eps) for n in norms}
    if len(acts) != 1 or len(eps) != 1:
        raise _unsupported(name, "different activations or norm eps across blocks")
    blk0 = model.blocks[0]
    ls = [not isinstance(b.ls1, nn.Identity) for b in model.blocks] + [not isinstance(b.ls2, nn.Identity) for b in model.blocks]
    if len(set(ls)) != 1:
        raise _unsupported(name, "layer scale on some blocks only")
    return ViTConfig(
        model_name=name,
        variant=variant,
        img_size=tuple(int(s) for s in pe.img_size),
        patch_size=tuple(int(s) for s in pe.patch_size),
        in_chans=int(pe.proj.in_channels),
        embed_dim=int(model.embed_dim),
        depth=len(model.blocks),
        num_heads=int(blk0.attn.num_heads),
        head_dim=int(blk0.attn.head_dim),
        mlp_hidden=int(blk0.mlp.fc1.out_features),
        num_classes=int(model.num_classes),
        qkv_bias=blk0.attn.qkv.bias is not None,
        proj_bias=blk0.attn.proj.bias is not None,
        patch_bias=pe.proj.bias is not None,
        class_token=model.cls_token is not None,
        reg_tokens=int(getattr(model, "num_reg_tokens", 0)),
        pos_embed=model.pos_embed is not None,
        no_embed_class=bool(model.no_embed_class),
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=not isinstance(model.norm, nn.Identity),
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
        global_pool=model.global_pool,
        pool_include_prefix=bool(model.pool_include_prefix),
        layer_scale=ls[0],
        act=acts.pop(),
        norm_eps=eps.pop(),
        overrides=tuple(overrides),
    )


def vit_config(name: str, variant: str = "timm", **kwargs) -> ViTConfig:
    """The engine configuration of TIMM model `name` (a UnsupportedModel error if we can't run it)."""
    try:
        model = create_timm_model(name, variant, device="meta", **kwargs)
    except UnsupportedModel:
        raise
    except (TypeError, AssertionError, ValueError, RuntimeError) as err:
        why = " ".join(str(err).split()) or type(err).__name__
        raise UnsupportedModel(f"{name}: TIMM could not build it with variant {variant!r}: {why}") from None
    return config_from_timm_model(model, name, variant, sorted(kwargs.items()))


def tiny_config_kwargs() -> dict:
    """Overrides that shrink any ViT to a few hundred thousand parameters, for tests and CPU runs."""
    return dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def describe(cfg: ViTConfig, dtype: Optional[torch.dtype] = None) -> str:
    parts = [f"{cfg.model_name} ({cfg.variant})", f"{cfg.img_size[0]}x{cfg.img_size[1]}/{cfg.patch_size[0]}",
             f"d={cfg.embed_dim} depth={cfg.depth} heads={cfg.num_heads}", f"tokens={cfg.seq_len}",
             f"pool={cfg.global_pool}"]
    if dtype is not None:
        parts.append(str(dtype).replace("torch.", ""))
    return ", ".join(parts)
