"""TIMM ViT weights -> the engine's layout, and the engine weight file (safetensors, never pickle).

Where the weights come from, in order: `--checkpoint PATH` (a local TIMM checkpoint:
.safetensors, a .pth/.bin state dict loaded with weights_only=True, or a JAX .npz), TIMM's
hub weights with `--pretrained` (needs the local cache or a network), else a seeded random
init drawn so the logits have a real spread. Every output names its source.

    python3 weight_utils.py --model_name vit_base_patch16_224 --param-path vit_b16.safetensors --seed 0
"""
from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from modeling.config import ViTConfig

FORMAT = "vit-engine-weights/1"
STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
PICKLE_SUFFIXES = (".pkl", ".pickle")


class WeightError(ValueError):
    """A weights problem the user can fix; the message is one line naming the file."""


@dataclass
class Source:
    """Where a model's weights came from, said in every output."""
    kind: str          # "checkpoint" | "pretrained" | "random"
    detail: str        # path and digest, TIMM name, or seed

    def __str__(self):
        return f"{self.kind}: {self.detail}"


# --- reading TIMM checkpoints ----------------------------------------------------------------

def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def _check_readable(path: Path):
    if not path.exists():
        raise WeightError(f"{path}: no such file")
    if path.is_dir():
        raise WeightError(f"{path}: is a directory, not a checkpoint file")
    if not os.access(path, os.R_OK):
        raise WeightError(f"{path}: not readable (permission denied)")
    if path.stat().st_size == 0:
        raise WeightError(f"{path}: empty file")


def load_state_dict(path) -> Dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a .safetensors or .pth/.bin file, without executing code."""
    path = Path(path)
    _check_readable(path)
    suffix = path.suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        raise WeightError(f"{path}: pickle files are refused: loading one can execute arbitrary code")
    if suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except Exception as err:  # safetensors raises its own error types for truncated/garbled files
            raise WeightError(f"{path}: not a readable safetensors file ({_one_line(err)})") from None
    elif suffix in STATE_DICT_SUFFIXES:
        if not zipfile.is_zipfile(path):
            with open(path, "rb") as f:
                truncated = f.read(2) == b"PK"  # a zip archive's start without its end
            raise WeightError(f"{path}: " + ("truncated or damaged PyTorch checkpoint (its zip directory is missing)"
                                             if truncated else "not a PyTorch zip checkpoint (legacy or raw pickle "
                                             "formats are refused: loading one can execute code)"))
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            found = re.search(r"GLOBAL (\S+)", str(err))
            what = f"it references {found.group(1)}" if found else _one_line(err)[:120]
            raise WeightError(f"{path}: refused: loading it would execute code ({what}; only tensors and "
                              f"plain containers are loaded); re-save it as a state dict of tensors or as "
                              f".safetensors") from None
        except Exception as err:
            raise WeightError(f"{path}: not a readable PyTorch checkpoint ({_one_line(err)[:160]})") from None
        for key in ("state_dict", "model", "model_state_dict", "module"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    else:
        raise WeightError(f"{path}: unknown checkpoint type {suffix or '(no suffix)'}; "
                          f"use .safetensors, .pth/.bin (state dict) or .npz")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightError(f"{path}: not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def load_into_timm(model: nn.Module, path) -> Source:
    """Load a local TIMM checkpoint into TIMM's model; one-line errors for every failure."""
    path = Path(path)
    if path.suffix.lower() == ".npz":
        _check_readable(path)
        if not zipfile.is_zipfile(path):
            raise WeightError(f"{path}: not a readable .npz archive (truncated or not numpy)")
        try:
            model.load_pretrained(str(path))  # TIMM's own JAX/big_vision .npz reader
        except Exception as err:
            raise WeightError(f"{path}: could not load as a TIMM .npz checkpoint ({_one_line(err)[:160]})") from None
        return Source("checkpoint", f"{path} sha256:{_digest(path)}")
    state = load_state_dict(path)
    from timm.models.vision_transformer import checkpoint_filter_fn
    try:
        state = checkpoint_filter_fn(state, model)
    except Exception:
        pass  # the strict comparison below names what does not fit
    own = model.state_dict()
    missing = [f"{k} {tuple(own[k].shape)}" for k in own if k not in state]
    unexpected = [f"{k} {tuple(state[k].shape)}" for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
             if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            parts.append(f"shape mismatch {', '.join(wrong[:2])}")
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}")
        raise WeightError(f"{path}: checkpoint does not fit this architecture: {'; '.join(parts)}")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return Source("checkpoint", f"{path} sha256:{_digest(path)}")


# --- seeded random weights with a real spread ------------------------------------------------

@torch.no_grad()
def randomize_(model: nn.Module, seed: int) -> Source:
    """Draw every parameter so that each one matters to the logits.

    TIMM's default init gives near-constant logits (zero biases, unit norms, tiny embeddings),
    against which any tolerance passes. Here biases, norm affines, embeddings, layer scales and
    the head are all random; QKV weights are drawn larger so attention is peaked rather than
    uniform (uniform attention would average each image's content away and leave logits that
    hardly depend on the input). Embeddings stay small (token variance near 0.1) so that the
    first LayerNorm's eps is visible to a float32 verification.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=gen) * std + mean

    def uniform(shape, lo, hi):
        return torch.rand(shape, generator=gen) * (hi - lo) + lo

    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        is_norm = ".norm" in f".{name}" or name.startswith(("norm", "fc_norm"))
        if name in ("pos_embed", "cls_token", "reg_token"):
            value = normal(p.shape, 0.03)
        elif leaf == "gamma":  # layer scale
            value = uniform(p.shape, 0.1, 1.0)
        elif is_norm and leaf == "weight":
            value = uniform(p.shape, 0.5, 1.5)
        elif is_norm and leaf == "bias":
            value = normal(p.shape, 0.1)
        elif p.dim() >= 2:
            fan_in = math.prod(p.shape[1:])
            std = 1.0
            if name.startswith("patch_embed"):
                std = 0.3
            elif name.endswith("attn.qkv.weight"):
                std = 2.0
            elif name.startswith("head"):
                std = 3.0
            value = normal(p.shape, std / math.sqrt(fan_in))
        else:  # GEMM biases
            value = normal(p.shape, 0.1)
        p.copy_(value)
    return Source("random", f"seeded random init, seed {seed}")


def source_model(cfg: ViTConfig, checkpoint: Optional[str] = None, seed: int = 0,
                 pretrained: bool = False):
    """TIMM's own model for `cfg`, in float32 on the CPU, eval mode, with the chosen weights."""
    if checkpoint and pretrained:
        raise WeightError("give either --checkpoint or --pretrained, not both")
    if pretrained:
        import timm
        from modeling.config import VARIANTS
        try:
            model = timm.create_model(cfg.model_name, pretrained=True, **VARIANTS[cfg.variant],
                                      **dict(cfg.overrides))
        except Exception as err:
            raise WeightError(f"could not get TIMM's pretrained weights for {cfg.model_name} "
                              f"({_one_line(err)[:100]}); download a checkpoint elsewhere and pass "
                              f"--checkpoint PATH") from None
        source = Source("pretrained", f"TIMM hub weights of {cfg.model_name}")
    else:
        model = cfg.timm_model("cpu")
        try:
            source = load_into_timm(model, checkpoint) if checkpoint else randomize_(model, seed)
        except WeightError as err:
            if cfg.variant != "timm":
                raise WeightError(f"{err} (the {cfg.variant} variant has no class token and pools by "
                                  f"average; TIMM's checkpoints fit --variant timm)") from None
            raise
    return model.float().eval().requires_grad_(False), source


# --- the engine layout -----------------------------------------------------------------------

def is_norm_param(name: str) -> bool:
    """Norm affines and bias shifts stay float32: they are tiny and feed float32 statistics."""
    leaf_owner = name.rsplit(".", 2)
    return name == "final_shift" or (len(leaf_owner) >= 2 and leaf_owner[-2].startswith("norm"))


@torch.no_grad()
def convert(model: nn.Module, cfg: ViTConfig) -> Dict[str, torch.Tensor]:
    """TIMM VisionTransformer -> engine state dict (float32): fused QKV as is, the patch conv as a
    GEMM weight, patch bias folded into the position table, class/register tokens ready-made,
    layer scale folded into proj/fc2, and the proj/fc2 biases turned into LayerNorm shifts."""
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    d = cfg.embed_dim
    out: Dict[str, torch.Tensor] = {}
    out["patch_embed.weight"] = sd["patch_embed.proj.weight"].reshape(d, -1).clone()
    pos = sd["pos_embed"][0] if cfg.pos_embed else torch.zeros(cfg.seq_len, d)
    n_prefix = cfg.num_prefix_tokens
    prefix = []
    if cfg.class_token:
        prefix.append(sd["cls_token"].reshape(1, d))
    if cfg.reg_tokens:
        prefix.append(sd["reg_token"].reshape(cfg.reg_tokens, d))
    prefix = torch.cat(prefix) if prefix else torch.zeros(0, d)
    if cfg.no_embed_class or not cfg.pos_embed:
        pos_patch = pos if cfg.pos_embed else torch.zeros(cfg.num_patches, d)
    else:
        prefix = prefix + pos[:n_prefix]
        pos_patch = pos[n_prefix:]
    if cfg.patch_bias:
        pos_patch = pos_patch + sd["patch_embed.proj.bias"]
    out["pos_patch"] = pos_patch.clone()
    out["prefix"] = prefix.clone()
    if cfg.pre_norm:
        out["norm_pre.weight"], out["norm_pre.bias"] = sd["norm_pre.weight"], sd["norm_pre.bias"]

    shift = torch.zeros(d)
    for i in range(cfg.depth):
        src, dst = f"blocks.{i}.", f"blocks.{i}."
        g1 = sd[src + "ls1.gamma"] if cfg.layer_scale else torch.ones(d)
        g2 = sd[src + "ls2.gamma"] if cfg.layer_scale else torch.ones(d)
        out[dst + "norm1.weight"], out[dst + "norm1.bias"] = sd[src + "norm1.weight"], sd[src + "norm1.bias"]
        out[dst + "norm1.shift"] = shift.clone()
        out[dst + "qkv.weight"] = sd[src + "attn.qkv.weight"]
        out[dst + "qkv.bias"] = sd.get(src + "attn.qkv.bias", torch.zeros(3 * cfg.num_heads * cfg.head_dim))
        out[dst + "proj.weight"] = g1[:, None] * sd[src + "attn.proj.weight"]
        if cfg.proj_bias:
            shift = shift + g1 * sd[src + "attn.proj.bias"]
        out[dst + "norm2.weight"], out[dst + "norm2.bias"] = sd[src + "norm2.weight"], sd[src + "norm2.bias"]
        out[dst + "norm2.shift"] = shift.clone()
        out[dst + "fc1.weight"] = sd[src + "mlp.fc1.weight"]
        out[dst + "fc1.bias"] = sd.get(src + "mlp.fc1.bias", torch.zeros(cfg.mlp_hidden))
        out[dst + "fc2.weight"] = g2[:, None] * sd[src + "mlp.fc2.weight"]
        if cfg.proj_bias:
            shift = shift + g2 * sd[src + "mlp.fc2.bias"]
    out["final_shift"] = shift
    final = "norm" if cfg.final_norm else "fc_norm" if cfg.fc_norm else None
    if final:
        out["norm.weight"], out["norm.bias"] = sd[final + ".weight"], sd[final + ".bias"]
    if cfg.num_classes:
        out["head.weight"], out["head.bias"] = sd["head.weight"], sd["head.bias"]
    return {k: v.contiguous() for k, v in out.items()}


def cast_state(state: Dict[str, torch.Tensor], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    return {k: (v.float() if is_norm_param(k) else v.to(dtype)).contiguous() for k, v in state.items()}


# --- the engine weight file ------------------------------------------------------------------

def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def save_engine_weights(path, state, cfg: ViTConfig, dtype: torch.dtype, source: Source):
    """Write a safetensors file whose metadata says model, config, dtype and weights source.
    Written to a temporary name and renamed, so a killed run never leaves half a file."""
    from safetensors.torch import save_file
    path = Path(path)
    meta = {"format": FORMAT, "config": cfg.to_json(), "dtype": dtype_name(dtype), "source": str(source)}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(cast_state(state, dtype), str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_engine_weights(path, cfg: ViTConfig, dtype: torch.dtype):
    """Read an engine weight file, refusing one made for another model, config or dtype."""
    from safetensors import safe_open
    path = Path(path)
    _check_readable(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise WeightError(f"{path}: not a readable engine weight file ({_one_line(err)[:120]})") from None
    if meta.get("format") != FORMAT:
        raise WeightError(f"{path}: not an engine weight file (format {meta.get('format')!r}, "
                          f"want {FORMAT!r}); convert TIMM checkpoints with weight_utils.py")
    try:
        theirs = ViTConfig.from_json(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise WeightError(f"{path}: engine weight file with an unreadable config ({_one_line(err)[:80]}); "
                          f"convert the weights again with weight_utils.py") from None
    if theirs != cfg:
        diff = [f"{k}={getattr(theirs, k)!r} (want {getattr(cfg, k)!r})"
                for k in cfg.__dataclass_fields__ if getattr(theirs, k) != getattr(cfg, k)]
        raise WeightError(f"{path}: made for another model: {', '.join(diff[:3])}")
    if meta.get("dtype") != dtype_name(dtype):
        raise WeightError(f"{path}: holds {meta.get('dtype')} weights, this run wants {dtype_name(dtype)}")
    return state, Source("engine file", f"{path} ({meta.get('source', 'unknown source')})")


def build_engine(cfg: ViTConfig, state: Dict[str, torch.Tensor], dtype: torch.dtype, device):
    from modeling.vision_transformer import VisionTransformer
    model = VisionTransformer(cfg).load_engine_state(cast_state(state, dtype))
    return model.pack_to(device).eval()


def seeded_engine(cfg: ViTConfig, dtype: torch.dtype, device, seed: int = 0):
    """The engine model with seeded random weights, as the tools build it."""
    return build_engine(cfg, convert(source_model(cfg, seed=seed)[0], cfg), dtype, device)


# --- command line ----------------------------------------------------------------------------

def _main():
    import click

    from engine.cli import dtype_option, fail_cleanly, model_option, parse_dtype, resolve_config, variant_option
    from engine.results import check_writable

    @click.command()
    @model_option(underscore=True)
    @variant_option("timm")
    @click.option("--param-path", type=click.Path(dir_okay=False), default=None,
                  help="engine weight file to write (.safetensors); default {model}_{dtype}.safetensors")
    @click.option("--checkpoint", type=str, default=None, help="local TIMM checkpoint to convert")
    @click.option("--pretrained", type=bool, default=False, help="TIMM hub weights (needs cache or network)")
    @click.option("--seed", type=int, default=0, show_default=True, help="seed of the random init")
    @dtype_option(default="float16")
    @fail_cleanly
    def main(model_name, variant, param_path, checkpoint, pretrained, seed, dtype):
        """Convert TIMM ViT weights to the engine's layout and write them (safetensors)."""
        cfg = resolve_config(model_name, variant)
        dt = parse_dtype(dtype)
        param_path = param_path or f"{model_name}_{dtype}.safetensors"
        if not param_path.endswith(".safetensors"):
            raise WeightError(f"{param_path}: engine weights are written as .safetensors only")
        check_writable(Path(param_path).parent)  # before any work, not after the conversion
        model, source = source_model(cfg, checkpoint, seed, pretrained)
        save_engine_weights(param_path, convert(model, cfg), cfg, dt, source)
        click.echo(f"wrote {param_path}: {model_name} ({variant}), {dtype}, weights from {source}")

    main()


if __name__ == "__main__":
    # run the imported module's copy: fail_cleanly knows weight_utils.WeightError, not __main__'s
    import weight_utils
    weight_utils._main()
