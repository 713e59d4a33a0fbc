"""Triton kernels for the memory-bound glue between the big GEMM and attention kernels.

Each kernel has a plain-PyTorch reference in ops.py and a test against it on odd sizes
(tests/test_ops.py); the tests run these kernels on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ops import GEMM_CONFIG_PATTERN


@triton.jit
def _layer_norm_kernel(X, Y, W, B, S, n_rows, n_cols, stride_x, stride_y, eps,
                       HAS_SHIFT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    # ROWS rows per program, each row whole in registers: one read and one write per element.
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
               shift: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim of a 2-D (rows, cols) tensor whose rows may be strided."""
    assert x.dim() == 2 and x.stride(1) == 1, "layer_norm wants a 2-D tensor with contiguous rows"
    n_rows, n_cols = x.shape
    if out is None:
        out = torch.empty((n_rows, n_cols), device=x.device, dtype=x.dtype)
    block = triton.next_power_of_2(n_cols)
    # about 4K elements per program keeps registers modest and programs plentiful
    rows = max(1, min(16, 4096 // block))
    num_warps = 4 if block * rows <= 4096 else 8
    grid = (triton.cdiv(n_rows, rows),)
    _layer_norm_kernel[grid](
        x, out, weight, bias, shift if shift is not None else weight, n_rows, n_cols,
        x.stride(0), out.stride(0), eps, HAS_SHIFT=shift is not None, ROWS=rows, BLOCK=block,
        num_warps=num_warps)
    return out


@triton.jit
def _attention_kernel(QKV, OUT, seq, heads, stride_qkv, stride_out, qk_scale,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    # One program per (query block, batch * head). Q, K and V are read straight out of the
    # fused (B * T, 3 * H * hd) QKV GEMM output and the result is written as (B * T, H * hd),
    # the proj GEMM's input: no layout copies on either side. Online softmax in base 2.
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // heads
    h = bh % heads
    width = heads * HEAD_DIM
    first_row = (b * seq).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_ptrs = QKV + (first_row + offs_m[:, None]) * stride_qkv + h * HEAD_DIM + offs_d[None, :]
    q = tl.load(q_ptrs, mask=(offs_m < seq)[:, None] & d_ok[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, seq, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < seq
        kv_rows = (first_row + offs_n) * stride_qkv + h * HEAD_DIM
        k = tl.load(QKV + width + kv_rows[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k) * qk_scale
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(QKV + 2 * width + kv_rows[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    o_ptrs = OUT + (first_row + offs_m[:, None]) * stride_out + h * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=(offs_m < seq)[:, None] & d_ok[None, :])


def attention_block_m(batch: int, heads: int, seq: int, sms: int = 132) -> int:
    """Query rows per program: the largest tile that still gives every SM about two programs."""
    for block_m in (128, 64, 32):
        if batch * heads * triton.cdiv(seq, block_m) >= 2 * sms:
            return block_m
    return 16


def attention(qkv: torch.Tensor, batch: int, heads: int, head_dim: int, block_m: int | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd)) v for every head, from the fused QKV rows; (B * T, H * hd) out."""
    rows = qkv.shape[0]
    seq = rows // batch
    out = torch.empty(rows, heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    if block_m is None:
        sms = torch.cuda.get_device_properties(qkv.device).multi_processor_count if qkv.is_cuda else 132
        block_m = attention_block_m(batch, heads, seq, sms)
    block_d = max(16, triton.next_power_of_2(head_dim))
    grid = (triton.cdiv(seq, block_m), batch * heads)
    _attention_kernel[grid](
        qkv, out, seq, heads, qkv.stride(0), out.stride(0), head_dim ** -0.5 * 1.4426950408889634,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=64,
        num_warps=4 if block_m <= 64 else 8, num_stages=2)
    return out


# --- GEMM with the glue fused in ---------------------------------------------------------------
#
# y = epilogue(prologue(a) @ w.T) for the four GEMMs of a block, with w in nn.Linear's (N, K)
# layout. Prologue (NORM): the LayerNorm before qkv and fc1, folded into the GEMM so the
# normalized activations never reach memory. With z = a + shift, g, b the norm's weight/bias:
#   LN(z) @ w.T + bias = rstd * (z*g) @ w.T - rstd * mean * colsum + (bias + w @ b),
#   colsum[n] = sum_k g[k] w[n, k]
# so the kernel multiplies the A tile by g on its way to the tensor cores, sums z and z^2 for
# the row statistics in the same K loop (A spans all of K), and applies the rest in the epilogue.
# Epilogue: + bias, GELU (erf or tanh form), + residual (C may alias R: in place).
# SPLIT_K > 1 splits the K loop over programs for small-M shapes that give too few output
# tiles to fill the GPU; the last program to finish a tile sums the float32 partials in split
# order (deterministic), so one launch does it all.

@triton.jit
def _gemm_epilogue(acc, s1, s2, offs_m, offs_n, m_ok, n_ok, K, eps, C, R, BIAS, COLSUM, stride_cm, stride_rm,
                   NORM: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr):
    if NORM:
        mean = s1 / K
        rstd = tl.rsqrt(tl.maximum(s2 / K - mean * mean, 0.0) + eps)
        colsum = tl.load(COLSUM + offs_n, mask=n_ok, other=0.0)
        acc = rstd[:, None] * (acc - mean[:, None] * colsum[None, :])
    if HAS_BIAS:
        acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if ACT == 1:  # GELU, erf form
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    if ACT == 2:  # GELU, tanh form: 0.5 x (1 + tanh(u)) = x * sigmoid(2u)
        acc = acc * tl.sigmoid(1.5957691216057308 * (acc + 0.044715 * acc * acc * acc))
    mask = m_ok[:, None] & n_ok[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    if HAS_RES:
        acc += tl.load(R + rows * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(C + rows * stride_cm + offs_n[None, :], acc.to(C.dtype.element_ty), mask=mask)


@triton.jit
def _gemm_kernel(A, W, C, R, BIAS, NORM_W, SHIFT, COLSUM, WS, LOCKS,
                 M, N, K, stride_am, stride_wn, stride_cm, stride_rm, eps,
                 NORM: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                 HAS_RES: tl.constexpr, SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BK: tl.constexpr, GROUP_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    # GROUP_M row tiles walk the column tiles together, so their W tiles are reused from L2
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BK) * BK
    k_lo = pid_k * k_span
    k_hi = tl.minimum(K, k_lo + k_span)
    a_rows = A + offs_m.to(tl.int64)[:, None] * stride_am
    w_cols = W + offs_n.to(tl.int64)[None, :] * stride_wn
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    s1 = tl.zeros((BM,), dtype=tl.float32)
    s2 = tl.zeros((BM,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_ok = offs_k < k_hi
        a = tl.load(a_rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_cols + offs_k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        if NORM:
            z = a.to(tl.float32)
            if HAS_SHIFT:
                z += tl.load(SHIFT + offs_k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            s1 += tl.sum(z, axis=1)
            s2 += tl.sum(z * z, axis=1)
            g = tl.load(NORM_W + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            a = (z * g[None, :]).to(A.dtype.element_ty)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    if SPLIT_K == 1:
        _gemm_epilogue(acc, s1, s2, offs_m, offs_n, m_ok, n_ok, K, eps, C, R, BIAS, COLSUM, stride_cm, stride_rm,
                       NORM, HAS_BIAS, ACT, HAS_RES)
    else:
        # partial tile (+ partial row sums) to the workspace, then count arrivals at this tile
        part = BM * BN + 2 * BM
        local = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        slot = WS + (pid * SPLIT_K + pid_k).to(tl.int64) * part
        tl.store(slot + local, acc)
        if NORM:
            tl.store(slot + BM * BN + tl.arange(0, BM), s1)
            tl.store(slot + BM * BN + BM + tl.arange(0, BM), s2)
        tl.debug_barrier()  # every thread's partial is written before the arrival is counted
        arrived = tl.atomic_add(LOCKS + pid, 1)
        if arrived == SPLIT_K - 1:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            s1 = tl.zeros((BM,), dtype=tl.float32)
            s2 = tl.zeros((BM,), dtype=tl.float32)
            first = WS + (pid * SPLIT_K).to(tl.int64) * part
            for s in tl.static_range(SPLIT_K):
                acc += tl.load(first + s * part + local, cache_modifier=".cg")
                if NORM:
                    s1 += tl.load(first + s * part + BM * BN + tl.arange(0, BM), cache_modifier=".cg")
                    s2 += tl.load(first + s * part + BM * BN + BM + tl.arange(0, BM), cache_modifier=".cg")
            tl.atomic_xchg(LOCKS + pid, 0)  # ready for the next launch
            _gemm_epilogue(acc, s1, s2, offs_m, offs_n, m_ok, n_ok, K, eps, C, R, BIAS, COLSUM, stride_cm,
                           stride_rm, NORM, HAS_BIAS, ACT, HAS_RES)


class GemmConfig:
    """A tile shape and split for _gemm_kernel, written as a plan value: "tBMxBNxBK_kSPLIT_wWARPS_sSTAGES"."""
    PATTERN = GEMM_CONFIG_PATTERN

    def __init__(self, bm, bn, bk, split_k=1, warps=4, stages=3):
        self.bm, self.bn, self.bk, self.split_k, self.warps, self.stages = bm, bn, bk, split_k, warps, stages

    @classmethod
    def parse(cls, text: str) -> "GemmConfig":
        import re
        match = re.fullmatch(cls.PATTERN, text)
        if not match:
            raise ValueError(f"not a GEMM tile config: {text!r} (want e.g. t64x128x64_k2_w4_s3)")
        return cls(*(int(v) for v in match.groups()))

    def __str__(self):
        return f"t{self.bm}x{self.bn}x{self.bk}_k{self.split_k}_w{self.warps}_s{self.stages}"


def gemm_candidates(m: int, n: int, k: int, sms: int = 132) -> list:
    """A few tile configs worth timing for an (m, n, k) GEMM: big tiles when there are enough of
    them to fill the GPU, otherwise smaller tiles and K split until about one wave of programs."""
    if m * n >= 4 * sms * 128 * 256:
        return [GemmConfig(128, 256, 64, 1, 8, 3), GemmConfig(128, 128, 64, 1, 8, 4)]
    out = []
    for bm, bn, warps in ((64, 64, 4), (64, 128, 4), (128, 128, 8)):
        tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
        split = 1
        while tiles * split * 2 <= sms * 1.25 and k // (split * 2) >= 256:
            split *= 2
        out.append(GemmConfig(bm, bn, 64, split, warps, 3 if bm * bn <= 64 * 128 else 4))
    return out


_SCRATCH = {}


def _scratch(device, floats: int, tiles: int):
    """Split-K workspace and per-tile arrival counters, one grow-only pair per device. The
    counters reset themselves, so a CUDA graph can replay the kernel without a memset."""
    ws, locks = _SCRATCH.get(device, (None, None))
    if ws is None or ws.numel() < floats:
        ws = torch.empty(floats, device=device, dtype=torch.float32)
    if locks is None or locks.numel() < tiles:
        locks = torch.zeros(tiles, device=device, dtype=torch.int32)
    _SCRATCH[device] = (ws, locks)
    return ws, locks


def gemm(a: torch.Tensor, weight: torch.Tensor, config, bias=None, act: str = "", residual=None,
         norm=None) -> torch.Tensor:
    """epilogue(prologue(a) @ weight.T) in one kernel (see above).
    norm: (norm_weight, shift or None, colsum, eps) folds a LayerNorm in; `bias` must then be the
    folded bias + weight @ norm_bias. act: "", "gelu" (erf) or "gelu_tanh". residual: added, and
    the result written into it in place."""
    cfg = GemmConfig.parse(config) if isinstance(config, str) else config
    assert a.dim() == 2 and a.stride(1) == 1 and weight.stride(1) == 1
    m, k = a.shape
    n = weight.shape[0]
    out = residual if residual is not None else torch.empty(m, n, device=a.device, dtype=a.dtype)
    tiles = triton.cdiv(m, cfg.bm) * triton.cdiv(n, cfg.bn)
    if cfg.split_k > 1:
        ws, locks = _scratch(a.device, tiles * cfg.split_k * (cfg.bm * cfg.bn + 2 * cfg.bm), tiles)
    else:
        ws = locks = out
    norm_w, shift, colsum, eps = norm if norm is not None else (out, None, out, 0.0)
    _gemm_kernel[(tiles, cfg.split_k)](
        a, weight, out, out, bias if bias is not None else out, norm_w,
        shift if shift is not None else norm_w, colsum, ws, locks,
        m, n, k, a.stride(0), weight.stride(0), out.stride(0), out.stride(0), eps,
        NORM=norm is not None, HAS_SHIFT=shift is not None, HAS_BIAS=bias is not None,
        ACT={"": 0, "gelu": 1, "gelu_tanh": 2}[act], HAS_RES=residual is not None, SPLIT_K=cfg.split_k,
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, GROUP_M=8, DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32",
        num_warps=cfg.warps, num_stages=cfg.stages)
    return out
