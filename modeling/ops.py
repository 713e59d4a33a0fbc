"""The ops the ViT is built from, each fast path beside its plain-PyTorch reference.

A `Plan` names which implementation each op uses. `Plan()` is the reference: plain PyTorch,
what runs on the CPU in float32. The compile step (engine/compile.py) picks the fast ones
by measuring them on the GPU at hand.

One trick spans several ops: the residual stream is stored *without* the biases of the
two GEMMs that add into it (attention proj, mlp fc2), so those GEMMs can accumulate into
the stream in place (`x += a @ W.T`, the residual as cuBLAS's C operand) with no bias and
no separate add kernel. The biases are summed ahead of time into a per-column `shift`
that the next LayerNorm adds on load (weight_utils.py computes the shifts). Every
reference below computes the same math in the plain way.

`out=`, where an op takes it, says where the engine's activation arena wants the result
(modeling/vision_transformer.py, ActivationArena). Implementations that can write there do; the
others return a new tensor, so callers always use the returned one.
"""
from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

NORM_IMPLS = ("torch", "triton")
MLP_ACT_IMPLS = ("separate", "epilogue", "triton", "triton_erf")
RESIDUAL_IMPLS = ("add", "addmm")
ATTENTION_BACKENDS = ("auto", "math", "flash", "efficient", "cudnn", "triton", "cuda")
EMBED_IMPLS = ("torch", "triton")


@dataclass(frozen=True)
class Plan:
    """Which implementation each op uses. The default is the plain-PyTorch reference."""
    norm: str = "torch"            # LayerNorm: torch's, or the Triton kernel (kernels.py)
    norm_tile: str = ""            # the Triton LayerNorm's launch: rows per program and warps, e.g. "r2w4"
                                   # ("": by size)
    mlp_act: str = "separate"      # fc1 + GELU: two kernels; GELU(tanh) in the cuBLASLt epilogue; or in our
                                   # GEMM's epilogue (fc1_tile), "triton" tanh, "triton_erf" exact
    residual: str = "add"          # proj/fc2 + residual: out-of-place add, or in-place addmm
    attention: str = "auto"        # an SDPA backend ("auto": torch's choice), or our Triton kernel
    attention_tile: str = ""       # the Triton kernel's launch tile, e.g. "m64n64w4s3tma" ("": by shape)
    qkv_tile: str = ""             # "" cuBLAS as torch calls it; "lt3" cuBLASLt's algorithm 3, "lt66.29.35.3.0.1"
                                   # an explicit cuBLASLt configuration (cublaslt.py);
                                   # else our persistent TMA GEMM with this tile (kernels.py)
    fc1_tile: str = ""             # likewise for fc1 ("ltN" with mlp_act "epilogue", tiles with "triton*")
    proj_tile: str = ""            # likewise for proj and fc2, accumulating into the residual stream in place
    fc2_tile: str = ""
    embed: str = "torch"           # patchify and the position add: torch's copies, or our Triton kernels

    def __post_init__(self):
        for name, allowed in (("norm", NORM_IMPLS), ("mlp_act", MLP_ACT_IMPLS),
                              ("residual", RESIDUAL_IMPLS), ("attention", ATTENTION_BACKENDS),
                              ("embed", EMBED_IMPLS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"plan.{name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        if self.attention_tile and self.attention == "cuda":
            from .cuda_attention import parse_variant
            parse_variant(self.attention_tile)
        elif self.attention_tile:
            parse_attention_tile(self.attention_tile)
        if self.norm_tile:
            parse_norm_tile(self.norm_tile)
        for name in ("qkv_tile", "fc1_tile", "proj_tile", "fc2_tile"):
            if getattr(self, name) and lt_algorithm(getattr(self, name)) is None:
                parse_gemm_tile(getattr(self, name), name)
        lt_fc1 = lt_algorithm(self.fc1_tile) is not None
        triton_fc1 = bool(self.fc1_tile) and not lt_fc1
        if self.mlp_act.startswith("triton") != triton_fc1 or (lt_fc1 and self.mlp_act != "epilogue"):
            raise ValueError(f"plan.mlp_act={self.mlp_act!r} with fc1_tile={self.fc1_tile!r}: a Triton tile goes "
                             "with mlp_act triton or triton_erf, and only with them; ltN with epilogue")

    def as_dict(self) -> dict:
        return asdict(self)


# --- patch embedding -------------------------------------------------------------------------

def patchify(images: torch.Tensor, patch_size, out=None, impl="torch") -> torch.Tensor:
    """(B, C, H, W) images -> (B * patches, C * ph * pw) rows, in the conv weight's (c, kh, kw) order,
    so the patch embedding is one GEMM instead of a convolution plus layout transposes. "triton":
    our kernel, reading whole image rows (torch's strided copy of this permutation ran at 40% of
    the copy bandwidth; perf-notes attempt 44)."""
    b, c, h, w = images.shape
    ph, pw = patch_size
    if impl == "triton":
        from . import kernels
        if out is None:
            out = torch.empty(b * (h // ph) * (w // pw), c * ph * pw, device=images.device, dtype=images.dtype)
        return kernels.patchify(images, patch_size, out)
    x = images.reshape(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5)
    if out is not None:
        out.view(b, h // ph, w // pw, c, ph, pw).copy_(x)
        return out
    return x.reshape(b * (h // ph) * (w // pw), c * ph * pw)


def patch_embed_reference(images, weight4d, bias):
    """What TIMM does: a strided convolution, flattened to tokens."""
    return F.conv2d(images, weight4d, bias, stride=weight4d.shape[-2:]).flatten(2).transpose(1, 2)


def assemble_tokens(patch_tokens: torch.Tensor, pos_patch: torch.Tensor, prefix: torch.Tensor,
                    batch: int, out=None, impl="torch") -> torch.Tensor:
    """Patch tokens + position table (patch bias folded in), behind the prefix tokens
    (class and register tokens, their position embedding folded in): (B * T, D). "triton": one
    pass at the copy bandwidth (torch's broadcast add ran at half of it; perf-notes attempt 44)."""
    n_patch, dim = pos_patch.shape
    n_prefix = prefix.shape[0]
    if out is None:
        out = torch.empty(batch * (n_prefix + n_patch), dim, device=patch_tokens.device, dtype=patch_tokens.dtype)
    if impl == "triton":
        from . import kernels
        return kernels.assemble_tokens(patch_tokens, pos_patch, prefix, batch, out)
    x = out.view(batch, n_prefix + n_patch, dim)
    x[:, :n_prefix] = prefix
    torch.add(patch_tokens.view(batch, n_patch, dim), pos_patch, out=x[:, n_prefix:])
    return out


# --- LayerNorm --------------------------------------------------------------------------------

def layer_norm_reference(x, weight, bias, eps, shift=None):
    x32 = x.float() if shift is None else x.float() + shift.float()
    return F.layer_norm(x32, x.shape[-1:], weight.float(), bias.float(), eps).to(x.dtype)


@functools.lru_cache(maxsize=None)
def parse_norm_tile(text: str):
    """"r2w4" -> (rows per program, warps), powers of two; ValueError when malformed."""
    m = re.fullmatch(r"r(\d+)w(\d+)", text)
    if not m or any(int(v) < 1 or int(v) & (int(v) - 1) for v in m.groups()) or int(m[2]) > 32:
        raise ValueError(f"plan.norm_tile={text!r}; expected like r2w4 (powers of two, at most 32 warps)")
    return int(m[1]), int(m[2])


def layer_norm(x, weight, bias, eps, shift=None, impl="torch", out=None, tile=""):
    """LayerNorm(x + shift) over the last dim; statistics in float32, output in x's dtype. The
    Triton kernel writes `out` (which may be x itself: each row is read whole before it is written),
    launched as `tile` says ("": by size)."""
    if impl == "triton":
        from . import kernels
        rows, warps = parse_norm_tile(tile) if tile else (0, 0)
        return kernels.layer_norm(x, weight, bias, eps, shift, out=out, rows=rows, num_warps=warps)
    return layer_norm_reference(x, weight, bias, eps, shift)


# --- linear layers ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)  # called on every forward outside a CUDA graph
def parse_gemm_tile(text: str, what: str = "gemm tile"):
    """"m128n256k64w8s3x2f" -> kernels.GemmTile (block m/n/k, warps, stages, epilogue slices,
    f: flattened persistent loop, o2: two programs per SM, ws: warp-specialized, sk3: K split in 3 work units
    per tile, for the in-place residual GEMMs only); ValueError when malformed."""
    m = re.fullmatch(r"m(\d+)n(\d+)k(\d+)w(\d+)s(\d+)x([12])(f?)(?:o([12]))?(ws)?(?:sk([2-8]))?", text)
    if not m or int(m[2]) % int(m[6]):
        raise ValueError(f"plan.{what}={text!r}; expected like m128n256k64w8s3x2f")
    if m[10] and what in ("qkv_tile", "fc1_tile"):
        raise ValueError(f"plan.{what}={text!r}: split K (sk) is for the in-place proj and fc2 GEMMs only")
    from .kernels import GemmTile
    return GemmTile(int(m[1]), int(m[2]), int(m[3]), int(m[4]), int(m[5]), int(m[6]), bool(m[7]), int(m[8] or 1),
                    ws=bool(m[9]), split_k=int(m[10] or 1))


@functools.lru_cache(maxsize=None)  # called on every forward outside a CUDA graph
def lt_algorithm(tile: str):
    """"lt3" -> 3, cuBLASLt's heuristic's algorithm number 3; "lt66.29.35.3.0.1" -> (66, 29, 35, 3, 0, 1),
    an explicit configuration (id, tile, stages, cluster, swizzle, custom option; cublaslt.py);
    None for anything else."""
    m = re.fullmatch(r"lt(0|[1-9]\d*)((?:\.(?:0|[1-9]\d*)){5})?", tile)  # no leading zeros: one name each
    if not m:
        return None
    if not m[2]:
        return int(m[1])
    config = tuple(int(v) for v in tile[2:].split("."))
    return config if config[3] < 1 << 16 and max(config) < 1 << 31 else None  # cluster id is 16 bits


def _lt(x, weight, bias, tile, epilogue="none", residual=False, out=None):
    from . import cublaslt
    problem = cublaslt.Problem(x.shape[0], weight.shape[0], x.shape[1], x.dtype, epilogue, residual)
    algorithm = lt_algorithm(tile)
    if isinstance(algorithm, int):
        return cublaslt.matmul(problem, algorithm, x, weight, bias, out=out)
    found = cublaslt.configured(problem, *algorithm)
    if found is None:
        raise cublaslt.CublasLtError(f"cuBLASLt refuses configuration {tile} for {problem}")
    return cublaslt.run(problem, *found, x, weight, bias, out=out)


def linear(x, weight, bias, tile="", out=None):
    """x @ W.T + b: cuBLAS as torch calls it, cuBLASLt's algorithm "ltN", or with another `tile`
    our Triton GEMM (kernels.linear)."""
    if lt_algorithm(tile) is not None:
        return _lt(x, weight, bias, tile, "none" if bias is None else "bias", out=out)
    if tile:
        from . import kernels
        return kernels.linear(x, weight, bias, out=out, tile=parse_gemm_tile(tile))
    if out is None:
        return F.linear(x, weight, bias)
    return torch.mm(x, weight.t(), out=out) if bias is None else torch.addmm(bias, x, weight.t(), out=out)


def gelu(x, act):
    return F.gelu(x, approximate="tanh" if act == "gelu_tanh" else "none")


def linear_gelu_reference(x, weight, bias, act):
    return gelu(F.linear(x, weight, bias), act)


def linear_gelu(x, weight, bias, act, impl="separate", tile="", out=None):
    """fc1 with its bias and GELU. "epilogue" runs GELU in the cuBLASLt epilogue (torch's call, or
    with `tile` "ltN" cuBLASLt's algorithm N), which computes the tanh approximation whatever `act`
    says (AITemplate's "fast_gelu" did the same); "triton" runs our GEMM with `tile` and the tanh
    approximation in its epilogue, "triton_erf" the same with the exact GELU."""
    if impl == "epilogue":
        if tile:  # cuBLASLt's algorithm "ltN"
            return _lt(x, weight, bias, tile, "gelu_bias", out=out)
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True, out=out)
    if impl in ("triton", "triton_erf"):
        from . import kernels
        return kernels.linear(x, weight, bias, "gelu" if impl == "triton_erf" else "gelu_tanh", out=out,
                              tile=parse_gemm_tile(tile))
    return linear_gelu_reference(x, weight, bias, act)


def residual_linear_reference(x, a, weight):
    return x + F.linear(a, weight)


def residual_linear(x, a, weight, impl="add", tile=""):
    """x + a @ weight.T with the bias deferred to the next shift. "addmm" accumulates into x in
    place: the residual is the GEMM's C operand, so no separate add kernel reads it again.
    A `tile` runs cuBLASLt's algorithm "ltN" or our Triton GEMM instead, also in place."""
    if lt_algorithm(tile) is not None:
        return _lt(a, weight, None, tile, residual=True, out=x)
    if tile:
        from . import kernels
        return kernels.linear(a, weight, out=x, accumulate=True, tile=parse_gemm_tile(tile))
    if impl == "addmm":
        return x.addmm_(a, weight.t())
    return residual_linear_reference(x, a, weight)


# --- attention --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def parse_attention_tile(text: str):
    """"m64n64w4s3tma" -> kernels.AttentionTile; ValueError when malformed."""
    m = re.fullmatch(r"m(\d+)n(\d+)w(\d+)s(\d+)(tma)?", text)
    if not m:
        raise ValueError(f"plan.attention_tile={text!r}; expected like m64n64w4s2 or m128n64w8s3tma")
    from .kernels import AttentionTile
    return AttentionTile(int(m[1]), int(m[2]), int(m[3]), int(m[4]), bool(m[5]))


def split_qkv(qkv: torch.Tensor, batch: int, heads: int, head_dim: int):
    """(B * T, 3 * H * hd) -> three (B, H, T, hd) strided views, no copies."""
    seq = qkv.shape[0] // batch
    q, k, v = qkv.view(batch, seq, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def attention_reference(qkv, batch, heads, head_dim):
    q, k, v = (t.float() for t in split_qkv(qkv, batch, heads, head_dim))
    attn = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
    out = attn.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(qkv.shape[0], heads * head_dim).to(qkv.dtype)


def attention(qkv, batch, heads, head_dim, impl="auto", tile="", out=None):
    """Multi-head self-attention on the fused QKV output: our Triton kernel (launched with `tile`,
    or a tile chosen by shape), our CUDA C++ kernel for short sequences on Hopper ("cuda"), or
    SDPA on strided views with the backend chosen by the caller's `sdpa_backend` context."""
    if impl == "triton":
        from . import kernels
        return kernels.attention(qkv, batch, heads, head_dim, tile=parse_attention_tile(tile) if tile else None,
                                 out=out)
    if impl == "cuda":  # Hopper, <= 256 tokens (cuda_attention.supported)
        from . import cuda_attention
        return cuda_attention.attention(qkv, batch, heads, out=out, variant=tile or "w2s2")
    q, k, v = split_qkv(qkv, batch, heads, head_dim)
    out = F.scaled_dot_product_attention(q, k, v)
    # flash and cuDNN lay the output out as (B, T, H, hd): this reshape is then a free view
    return out.transpose(1, 2).reshape(qkv.shape[0], heads * head_dim)


def sdpa_backend(name: str):
    """Context manager restricting SDPA to one backend ("auto": torch's own choice)."""
    import contextlib
    if name in ("auto", "triton", "cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[name]
    return sdpa_kernel([backend])


# --- pooling ----------------------------------------------------------------------------------

def pool_tokens(x: torch.Tensor, pool: str, num_prefix: int, include_prefix: bool) -> torch.Tensor:
    """TIMM's global pooling of (B, T, D) tokens."""
    if pool == "token":
        return x[:, 0]
    x = x if include_prefix else x[:, num_prefix:]
    if pool == "avg":
        return x.mean(dim=1)
    if pool == "max":
        return x.amax(dim=1)
    if pool == "avgmax":
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))
    raise ValueError(f"unknown pool {pool!r}")
