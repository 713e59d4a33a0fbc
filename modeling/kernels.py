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
