"""Triton kernels for the memory-bound glue between the big GEMM and attention kernels.

Each kernel has a plain-PyTorch reference in ops.py and a test against it on odd sizes
(tests/test_ops.py); the tests run these kernels on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


try:  # Triton 3.3 and later: programmatic dependent launch (Hopper and later)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:
    @triton.jit
    def gdc_wait():
        pass

    @triton.jit
    def gdc_launch_dependents():
        pass

_COMPILE_ONLY = threading.local()

# Programmatic dependent launch (docs/perf-notes.md, attempt 37): each kernel below is launched so
# that the GPU may start it while the kernel before it finishes. It waits (griddepcontrol.wait)
# before it reads or writes anything, and once every program of it runs, lets the next kernel
# launch: kernel launch and ramp-up overlap the previous kernel's tail, which at batch 1 is a
# good part of each 2-6 us kernel. FORCE_PDL None: wherever the GPU supports it (Hopper and later);
# tools set True or False to compare.
FORCE_PDL = None


def use_pdl(device: torch.device) -> bool:
    return _pdl_supported(device) if FORCE_PDL is None else FORCE_PDL


@functools.lru_cache(maxsize=None)  # asked on every launch outside a CUDA graph
def _pdl_supported(device: torch.device) -> bool:
    if device.type != "cuda" or torch.version.hip is not None or torch.cuda.get_device_capability(device)[0] < 9:
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        return "launch_pdl" in CUDAOptions.__dataclass_fields__
    except ImportError:
        return False


@contextlib.contextmanager
def compile_only():
    """Within this context (in this thread), the kernel launches below compile their kernel and
    return without running it: the plan compiles its candidates side by side in threads."""
    _COMPILE_ONLY.on = True
    try:
        yield
    finally:
        _COMPILE_ONLY.on = False


def _launch(kernel, grid, *args, pdl: bool = False, **kwargs):
    kwargs["PDL"] = pdl
    if pdl:
        kwargs["launch_pdl"] = True
    if getattr(_COMPILE_ONLY, "on", False):
        kernel.warmup(*args, grid=grid, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


@triton.jit
def _layer_norm_kernel(X, Y, W, B, S, n_rows, n_cols, stride_x, stride_y, eps,
                       HAS_SHIFT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # ROWS rows per program, each row whole in registers: one read and one write per element.
    if PDL:  # launched early (programmatic dependent launch): wait for the kernel before
        gdc_wait()
        gdc_launch_dependents()
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    x = tl.load(X + rows[:, None].to(tl.int64) * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        # the residual stream is stored without the biases of the residual GEMMs (see ops.py)
        x += tl.load(S + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    mean = tl.sum(x, axis=1) / n_cols
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + rows[:, None].to(tl.int64) * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
               shift: torch.Tensor | None = None, out: torch.Tensor | None = None,
               rows: int = 0, num_warps: int = 0) -> torch.Tensor:
    """LayerNorm over the last dim of a 2-D (rows, cols) tensor whose rows may be strided; `rows`
    per program and `num_warps` (0: by size)."""
    assert x.dim() == 2 and x.stride(1) == 1, "layer_norm wants a 2-D tensor with contiguous rows"
    n_rows, n_cols = x.shape
    if out is None:
        out = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(n_cols)
    # about 4K elements per program keeps registers modest and programs plentiful
    rows = rows or max(1, min(16, 4096 // block))
    num_warps = num_warps or (4 if block * rows <= 4096 else 8)
    grid = (triton.cdiv(n_rows, rows),)
    _launch(
        _layer_norm_kernel, grid, x, out, weight, bias, shift if shift is not None else weight, n_rows, n_cols,
        x.stride(0), out.stride(0), eps, HAS_SHIFT=shift is not None, ROWS=rows, BLOCK=block,
        num_warps=num_warps, pdl=use_pdl(x.device))
    return out


# Launches of the LayerNorm that beat the by-size default at up to a few thousand rows
# (tools/norm_tiles.py, perf-notes attempt 30): fewer rows per program, more programs in flight.
NORM_TILE_CANDIDATES = ("r2w4", "r2w8", "r4w8")  # r1w2 won once in 121 plans below 8192 rows (engines 15-20)


@triton.jit
def _patchify_kernel(IMG, OUT, chans, height, width, grid_w, PH: tl.constexpr, PW: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, PDL: tl.constexpr):
    # One program per (image, row of patches, channel): its PH image rows are read whole (coalesced)
    # and each PW-wide piece lands in its patch's row, at the (c, kh, kw) column of the conv weight.
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid = tl.program_id(0)
    c = pid % chans
    row_of_patches = pid // chans  # image * grid_h + patch row
    grid_h = height // PH
    b = row_of_patches // grid_h
    kh = tl.arange(0, BLOCK_H)[:, None]
    w = tl.arange(0, BLOCK_W)[None, :]
    ok = (kh < PH) & (w < width)
    src = IMG + ((b * chans + c) * height + (row_of_patches % grid_h) * PH + kh).to(tl.int64) * width + w
    x = tl.load(src, mask=ok)
    dst_row = (row_of_patches * grid_w + w // PW).to(tl.int64)
    tl.store(OUT + dst_row * (chans * PH * PW) + c * PH * PW + kh * PW + w % PW, x, mask=ok)


def patchify(images: torch.Tensor, patch_size, out: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) images -> (B * patches, C * ph * pw) rows in `out` (ops.patchify's layout)."""
    b, c, h, w = images.shape
    ph, pw = patch_size
    images = images.contiguous()
    _launch(_patchify_kernel, (b * (h // ph) * c,), images, out, c, h, w, w // pw, PH=ph, PW=pw,
            BLOCK_H=triton.next_power_of_2(ph), BLOCK_W=triton.next_power_of_2(w), num_warps=4,
            pdl=use_pdl(images.device))
    return out


@triton.jit
def _assemble_kernel(TOKENS, POS, PREFIX, X, n_rows, seq, n_prefix, dim,
                     ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    # rows of the residual stream: prefix tokens as they are, patch tokens plus their position row
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    ok = (r < n_rows) & (d < dim)
    t = r % seq
    patch = t >= n_prefix
    n = t - n_prefix
    tok = tl.load(TOKENS + ((r // seq) * (seq - n_prefix) + n).to(tl.int64) * dim + d, mask=ok & patch, other=0.0)
    pos = tl.load(POS + n * dim + d, mask=ok & patch, other=0.0)
    pre = tl.load(PREFIX + t * dim + d, mask=ok & (t < n_prefix), other=0.0)
    x = tl.where(patch, tok.to(tl.float32) + pos.to(tl.float32), pre.to(tl.float32))
    tl.store(X + r.to(tl.int64) * dim + d, x.to(X.dtype.element_ty), mask=ok)


def assemble_tokens(patch_tokens: torch.Tensor, pos_patch: torch.Tensor, prefix: torch.Tensor, batch: int,
                    out: torch.Tensor) -> torch.Tensor:
    """(B * T, D) stream in `out`: each image's prefix rows, then its patch tokens + position rows."""
    n_patch, dim = pos_patch.shape
    seq = n_patch + prefix.shape[0]
    block_d = triton.next_power_of_2(dim)
    rows = max(1, 4096 // block_d)
    _launch(_assemble_kernel, (triton.cdiv(batch * seq, rows),), patch_tokens, pos_patch, prefix, out,
            batch * seq, seq, prefix.shape[0], dim, ROWS=rows, BLOCK_D=block_d, num_warps=4,
            pdl=use_pdl(out.device))
    return out


def norm_tiles(rows: int) -> tuple:
    """The LayerNorm launches worth timing besides the default: below 4096 rows only (from there
    the default is within 1-2% of the best)."""
    return NORM_TILE_CANDIDATES if rows < 4096 else ()


@triton.jit
def _attention_step(q, k, v, m_i, l_i, acc, qk_scale, n_ok, MASKED: tl.constexpr):
    # one key block of the online softmax, in base 2 with the scale folded into the exponent
    s = tl.dot(q, tl.trans(k))
    if MASKED:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)
    p = tl.math.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_new, l_i, acc


@triton.jit
def _load_rows(P, desc, b, row0, col, seq, stride, offs, offs_d, d_ok,
               ROWS: tl.constexpr, BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr, MASKED: tl.constexpr):
    # rows row0.. of image b, columns col.. of a (B * T, width) buffer, zeros past the sequence
    if USE_TMA:
        return desc.load([b, row0, col]).reshape(ROWS, BLOCK_D)
    rows = row0 + offs
    ptrs = P + (b * seq + rows)[:, None].to(tl.int64) * stride + col + offs_d[None, :]
    if MASKED:
        return tl.load(ptrs, mask=(rows < seq)[:, None] & d_ok[None, :], other=0.0)
    return tl.load(ptrs, mask=d_ok[None, :], other=0.0)


@triton.jit
def _attention_kernel(QKV, OUT, q_desc, kv_desc, o_desc, seq, heads, stride_qkv, stride_out, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr, PDL: tl.constexpr):
    # One program per (query block, batch * head). Q, K and V are read straight out of the
    # fused (B * T, 3 * H * hd) QKV GEMM output and the result is written as (B * T, H * hd),
    # the proj GEMM's input: no layout copies on either side. Full key blocks run unmasked;
    # the ragged last one (T = 196, 577, ...) is masked. With USE_TMA the tiles move by the
    # Hopper tensor-memory accelerator through descriptors on (B, T, width) views.
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    width = heads * HEAD_DIM
    q_col = h * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = _load_rows(QKV, q_desc, b, pid_m * BLOCK_M, q_col, seq, stride_qkv, tl.arange(0, BLOCK_M), offs_d, d_ok,
                   BLOCK_M, BLOCK_D, USE_TMA, True)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    n_full = (seq // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        k = _load_rows(QKV, kv_desc, b, start, width + q_col, seq, stride_qkv, offs_n, offs_d, d_ok,
                       BLOCK_N, BLOCK_D, USE_TMA, False)
        v = _load_rows(QKV, kv_desc, b, start, 2 * width + q_col, seq, stride_qkv, offs_n, offs_d, d_ok,
                       BLOCK_N, BLOCK_D, USE_TMA, False)
        m_i, l_i, acc = _attention_step(q, k, v, m_i, l_i, acc, qk_scale, offs_n, False)
    if n_full < seq:
        k = _load_rows(QKV, kv_desc, b, n_full, width + q_col, seq, stride_qkv, offs_n, offs_d, d_ok,
                       BLOCK_N, BLOCK_D, USE_TMA, True)
        v = _load_rows(QKV, kv_desc, b, n_full, 2 * width + q_col, seq, stride_qkv, offs_n, offs_d, d_ok,
                       BLOCK_N, BLOCK_D, USE_TMA, True)
        m_i, l_i, acc = _attention_step(q, k, v, m_i, l_i, acc, qk_scale, n_full + offs_n < seq, True)
    out = (acc / l_i[:, None]).to(OUT.dtype.element_ty)
    if USE_TMA:
        o_desc.store([b, pid_m * BLOCK_M, q_col], out.reshape(1, BLOCK_M, BLOCK_D))
    else:
        o_ptrs = OUT + (b * seq + offs_m[:, None]).to(tl.int64) * stride_out + q_col + offs_d[None, :]
        tl.store(o_ptrs, out, mask=(offs_m < seq)[:, None] & d_ok[None, :])


@dataclass(frozen=True)
class AttentionTile:
    """How the Triton attention kernel is launched: query rows and key rows per step, warps,
    pipeline stages, and whether tiles move by TMA (Hopper and later, power-of-2 head dims)."""
    block_m: int
    block_n: int = 64
    warps: int = 4
    stages: int = 2
    tma: bool = False

    def __str__(self):
        return f"m{self.block_m}n{self.block_n}w{self.warps}s{self.stages}{'tma' if self.tma else ''}"


def attention_block_m(batch: int, heads: int, seq: int, sms: int = 132) -> int:
    """Query rows per program: the largest tile that still gives every SM about two programs."""
    for block_m in (128, 64, 32):
        if batch * heads * triton.cdiv(seq, block_m) >= 2 * sms:
            return block_m
    return 16


def default_attention_tile(batch: int, heads: int, seq: int, sms: int = 132) -> AttentionTile:
    block_m = attention_block_m(batch, heads, seq, sms)
    return AttentionTile(block_m, 64, 4 if block_m <= 64 else 8, 2, False)


def _has_tensor_descriptors() -> bool:
    try:  # Triton 3.4 and later
        from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: F401
        return True
    except ImportError:
        return False


def _tma_device(device: torch.device) -> bool:
    """A Hopper-class NVIDIA GPU (or the CPU interpreter) and a Triton with tensor descriptors."""
    if not _has_tensor_descriptors():
        return False
    if device.type == "cpu":
        return True
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9


def tma_supported(device: torch.device, head_dim: int) -> bool:
    """TMA needs a Hopper-class NVIDIA GPU (or the CPU interpreter), a Triton with tensor
    descriptors, and a power-of-2 head dim."""
    return not (head_dim < 16 or head_dim & (head_dim - 1)) and _tma_device(device)


# The tiles that won somewhere on the H100 (tools/attention_tiles.py, docs/perf-notes.md): 64 query
# rows with 4 warps almost everywhere, TMA loads at 576 tokens, long key steps at batch 1. Below
# LIBRARY_ROWS, in 121 plans of engines 15-20, nothing else won but the by-size default once (perf-notes
# attempt 64): each tile left out is a kernel less to compile cold.
_TILE_CANDIDATES = ("m64n64w4s3", "m64n64w4s3tma", "m64n32w4s3", "m64n128w4s2")
# From LIBRARY_ROWS rows only these ever won (134 measured plans with Triton attention there,
# sessions 3-13; the others chose cuDNN): each tile left out is a kernel less to compile and time
# (perf-notes attempt 41).
_LARGE_TILE_CANDIDATES = ("m64n64w4s3", "m64n64w4s3tma", "m128n64w8s3tma")


def attention_tiles(batch: int, seq: int, head_dim: int, device: torch.device) -> list:
    """The tiles worth timing at this shape (engine/compile.py picks the fastest)."""
    from .ops import parse_attention_tile
    names = _LARGE_TILE_CANDIDATES if batch * seq >= LIBRARY_ROWS else _TILE_CANDIDATES
    tiles = [parse_attention_tile(t) for t in names]
    return [t for t in tiles if not t.tma or tma_supported(device, head_dim)]


def attention(qkv: torch.Tensor, batch: int, heads: int, head_dim: int,
              tile: AttentionTile | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for every head, from the fused QKV rows; (B * T, H * hd) out
    (written to `out` when given: contiguous)."""
    rows = qkv.shape[0]
    seq = rows // batch
    if out is None:
        out = torch.empty(rows, heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    if tile is None:
        sms = torch.cuda.get_device_properties(qkv.device).multi_processor_count if qkv.is_cuda else 132
        tile = default_attention_tile(batch, heads, seq, sms)
    block_d = max(16, triton.next_power_of_2(head_dim))
    q_desc = kv_desc = o_desc = qkv
    if tile.tma:
        assert qkv.stride(1) == 1 and block_d == head_dim, "TMA attention wants contiguous rows, power-of-2 hd"
        from triton.tools.tensor_descriptor import TensorDescriptor
        view = qkv.as_strided((batch, seq, qkv.shape[1]), (seq * qkv.stride(0), qkv.stride(0), 1))
        q_desc = TensorDescriptor.from_tensor(view, [1, tile.block_m, block_d])
        kv_desc = TensorDescriptor.from_tensor(view, [1, tile.block_n, block_d])
        o_desc = TensorDescriptor.from_tensor(out.view(batch, seq, -1), [1, tile.block_m, block_d])
    grid = (triton.cdiv(seq, tile.block_m), batch * heads)
    _launch(
        _attention_kernel, grid, qkv, out, q_desc, kv_desc, o_desc, seq, heads, qkv.stride(0), out.stride(0),
        head_dim ** -0.5 * 1.4426950408889634,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, USE_TMA=tile.tma,
        num_warps=tile.warps, num_stages=tile.stages, pdl=use_pdl(qkv.device))
    return out


# --- a persistent GEMM with the glue in its epilogue ------------------------------------------

@triton.jit
def _gelu(x, ACT: tl.constexpr):
    # ACT 1: exact (erf). 2, 3: the tanh approximation 0.5 x (1 + tanh(u)), u = sqrt(2/pi)(x + 0.044715 x^3),
    # as x * sigmoid(2u) (2: portable, two special-function ops), or with the GPU's one-instruction tanh
    # (3, NVIDIA): the special-function unit is what the epilogue waits on (docs/perf-notes.md, attempt 14).
    if ACT == 1:
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    if ACT == 2:
        return x * tl.sigmoid(2.0 * u)
    t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=tl.float32, is_pure=True, pack=1)
    return 0.5 * x * (1.0 + t)


@triton.jit
def _linear_kernel(a_desc, w_desc, c_desc, BIAS, M, N, K,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, SPLIT_N: tl.constexpr,
                   HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACCUMULATE: tl.constexpr,
                   FLATTEN: tl.constexpr, WS: tl.constexpr, REDUCE: tl.constexpr, SPLIT_K: tl.constexpr,
                   PDL: tl.constexpr):
    # C = act(A @ W^T + bias), or C += A @ W^T (ACCUMULATE: the residual stream in place).
    # One program per SM walks the output tiles (grouped by GROUP_M rows of tiles so W stays in
    # L2); operand tiles move by TMA, and with FLATTEN the pipeliner issues the next tile's loads
    # while this tile's epilogue runs. The epilogue is stored in SPLIT_N column slices to keep
    # its registers and shared-memory staging small. WS asks Triton to warp-specialize the loop
    # (on Hopper: a producer warp for the TMA loads, the 8 warps split into two consumer groups).
    # ACCUMULATE adds the tile, rounded to C's dtype, into C by a TMA reduce-add store (REDUCE 1;
    # REDUCE 2, the CPU interpreter's stand-in, loads and stores with the same rounding): no load
    # of C to wait for. So SPLIT_K work units can share a tile, each adding its own slice of K
    # into C (the same trip count for every unit: the last one reads zeros past K). The order of
    # those adds is the GPU's, so a split tile is not bitwise deterministic.
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    n_m = tl.cdiv(M, BLOCK_M)
    n_n = tl.cdiv(N, BLOCK_N)
    k_steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    n_tiles = n_m * n_n
    per_group = GROUP_M * n_n
    SLICE: tl.constexpr = BLOCK_N // SPLIT_N
    for unit in tl.range(tl.program_id(0), n_tiles * SPLIT_K, PROGRAMS, flatten=FLATTEN, warp_specialize=WS):
        tile = unit % n_tiles
        k_first = 0
        if SPLIT_K > 1:
            k_first = (unit // n_tiles) * k_steps * BLOCK_K
        group = tile // per_group
        first_m = group * GROUP_M
        rows_here = min(n_m - first_m, GROUP_M)
        pid_m = first_m + (tile % per_group) % rows_here
        pid_n = (tile % per_group) // rows_here
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for ks in range(k_steps):
            a = a_desc.load([off_m, k_first + ks * BLOCK_K])
            w = w_desc.load([off_n, k_first + ks * BLOCK_K])
            acc = tl.dot(a, w.T, acc)
        if SPLIT_N == 1:
            parts = (acc,)
        else:
            parts = tl.split(acc.reshape(BLOCK_M, 2, SLICE).permute(0, 2, 1))
        for i in tl.static_range(SPLIT_N):
            part = parts[i]
            cols = off_n + i * SLICE
            if HAS_BIAS:
                offs = cols + tl.arange(0, SLICE)
                part += tl.load(BIAS + offs, mask=offs < N, other=0.0).to(tl.float32)[None, :]
            if ACT:
                part = _gelu(part, ACT)
            if not ACCUMULATE:
                c_desc.store([off_m, cols], part.to(c_desc.dtype))
            elif REDUCE == 1:
                c_desc.atomic_add([off_m, cols], part.to(c_desc.dtype))
            else:  # the interpreter has no reduce-add store
                c_desc.store([off_m, cols], (part.to(c_desc.dtype).to(tl.float32)
                                             + c_desc.load([off_m, cols]).to(tl.float32)).to(c_desc.dtype))


@dataclass(frozen=True)
class GemmTile:
    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    warps: int = 8
    stages: int = 3
    split_n: int = 1
    flatten: bool = True
    per_sm: int = 1    # programs per SM: 2 lets one program's epilogue overlap the other's mainloop
    group_m: int = 8
    ws: bool = False   # Triton's automatic warp specialization of the tile loop (8-warp tiles on Hopper)
    split_k: int = 1   # in-place accumulation only: work units per tile, each adding a slice of K

    def __str__(self):
        return (f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.warps}s{self.stages}"
                f"x{self.split_n}{'f' if self.flatten else ''}{f'o{self.per_sm}' if self.per_sm > 1 else ''}"
                f"{'ws' if self.ws else ''}{f'sk{self.split_k}' if self.split_k > 1 else ''}")

    def fits(self, shared_bytes: int = 232448) -> bool:
        """Whether the operand ring and the epilogue staging fit the H100's shared memory, so a
        tile that cannot launch is not compiled and timed at all. (The in-place residual stages
        only its output too: C is never loaded, the tile is added by a reduce-add store.)"""
        ring = self.stages * (self.block_m + self.block_n) * self.block_k * 2
        staging = self.block_m * (self.block_n // self.split_n) * 2
        return (ring + staging) * self.per_sm <= shared_bytes


# Tiles that beat cuBLAS somewhere on the H100 (tools/gemm_tiles.py, docs/perf-notes.md): wide
# 128x256 tiles with a two-slice epilogue at large M (warp-specialized or not), 64x128 / 128x128 at
# batch 1, 128-deep K steps for the small-M GEMMs (half the pipeline round trips per byte moved;
# perf-notes attempt 28), and split K for the small-M residual GEMMs (attempt 29). The 128x128 split-2 tile
# is out: it never won in 121 plans below 8192 rows (engines 15-20, attempt 64).
GEMM_TILE_CANDIDATES = ("m128n256k64w8s4x2f", "m128n256k64w8s3x2f", "m128n256k64w8s3x2fws", "m128n128k64w4s4x1f",
                        "m64n128k64w4s4x1f", "m64n128k128w4s4x1f", "m64n64k128w4s4x1f",
                        "m128n128k64w4s4x1fsk3", "m64n128k128w4s4x1fsk3",
                        "m64n64k128w4s4x1fsk2")


# From this many rows the engine times only the vendor library's GEMMs: cuBLAS as torch calls it and
# the other algorithms cuBLASLt's heuristic offers (modeling/cublaslt.py). There our tiles never beat
# the best of those alone (docs/perf-notes.md, attempt 35), and compiling them cost seconds.
LIBRARY_ROWS = 8192


def gemm_tiles(rows: int, deterministic: bool = False) -> tuple:
    """The candidate tiles worth timing for a GEMM of `rows` rows. Each tile is a kernel to compile
    (~1 s from a cold cache) and time, so only those that ever won at such sizes: none from
    LIBRARY_ROWS; below 1024 rows (ViT-B/16 batch 1-4, ViT-L/16 batch 1), the tiles at most 128
    columns wide (tools/gemm_tiles.py: the 128x256 tiles trail the narrower ones there by 30% to
    2.5x), and the 128-deep tiles only there; split K below 2048 rows, where the unsplit tiles leave
    SMs idle, and not at all when `deterministic` (the split units' adds land in whatever order the
    GPU runs them)."""
    from .ops import parse_gemm_tile
    if rows >= LIBRARY_ROWS:
        return ()
    tiles = [parse_gemm_tile(t) for t in GEMM_TILE_CANDIDATES]
    if deterministic or rows >= 2048:
        tiles = [t for t in tiles if t.split_k == 1]
    if rows < 1024:
        return tuple(str(t) for t in tiles if t.block_n <= 128)
    return tuple(str(t) for t in tiles if t.block_k == 64)


def gemm_supported(device: torch.device, dtype: torch.dtype, *dims: int) -> bool:
    """Our GEMM moves tiles by TMA: a Hopper-class NVIDIA GPU (or the CPU interpreter), 16-bit
    floats, and rows whose byte strides are multiples of 16."""
    return dtype in (torch.float16, torch.bfloat16) and not any(d % 8 for d in dims) and _tma_device(device)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, act: str = "",
           out: torch.Tensor | None = None, accumulate: bool = False, tile: GemmTile = GemmTile()) -> torch.Tensor:
    """act(x @ weight.T + bias) with act "" / "gelu" (erf) / "gelu_tanh", written to `out` (new if
    None); with `accumulate` (no bias or act), out += x @ weight.T in place. x (M, K), weight (N, K),
    out (M, N), all with contiguous rows."""
    from triton.tools.tensor_descriptor import TensorDescriptor
    M, K = x.shape
    N = weight.shape[0]
    assert not (accumulate and (out is None or bias is not None or act)), \
        "in-place accumulation needs `out` and takes no bias or act"
    assert accumulate or tile.split_k == 1, f"tile {tile}: split K is for in-place accumulation only"
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    a_desc = TensorDescriptor.from_tensor(x, [tile.block_m, tile.block_k])
    w_desc = TensorDescriptor.from_tensor(weight, [tile.block_n, tile.block_k])
    c_desc = TensorDescriptor.from_tensor(out, [tile.block_m, tile.block_n // tile.split_n])
    units = triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n) * tile.split_k
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    programs = min(sms * tile.per_sm, units)
    _launch(
        _linear_kernel, (programs,), a_desc, w_desc, c_desc, bias if bias is not None else weight, M, N, K,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
        PROGRAMS=programs, SPLIT_N=tile.split_n, HAS_BIAS=bias is not None,
        ACT={"": 0, "gelu": 1, "gelu_tanh": 3 if x.is_cuda else 2}[act], ACCUMULATE=accumulate, FLATTEN=tile.flatten,
        WS=tile.ws, REDUCE=1 if x.is_cuda else 2, SPLIT_K=tile.split_k,
        num_warps=tile.warps, num_stages=tile.stages, pdl=use_pdl(x.device))
    return out
