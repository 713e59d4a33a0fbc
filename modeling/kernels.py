"""Triton kernels for the memory-bound glue between the big GEMM and attention kernels.

Each kernel has a plain-PyTorch reference in ops.py and a test against it on odd sizes
(tests/test_ops.py); the tests run these kernels on the CPU under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


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
