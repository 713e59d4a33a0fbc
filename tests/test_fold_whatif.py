"""tools/fold_whatif.py's folded blocks on the CPU: with our GEMM and the 1/std pass replaced by their
float references, each folded forward (deferred shifts, LayerNorm affine, bias, GELU) equals the plain one."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F

import weight_utils as wu
from modeling import ops, vision_transformer as vt
from modeling.config import vit_config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import fold_whatif  # noqa: E402


def _gemm(x, w, bias=None, row_scale=None, gelu=False, out=None, cluster=2, shift=None, schedule="coop"):
    y = fold_whatif.wg.reference(x, w, bias, row_scale, gelu, shift)
    return y.to(x.dtype) if out is None else out.copy_(y)


def _rstd(x, rstd, eps, shift=None, mean=None):
    rstd.copy_(torch.rsqrt((x.double() + shift.double()).var(dim=1, unbiased=False) + eps))


@pytest.mark.parametrize("label", [v[0] for v in fold_whatif.VARIANTS])
def test_folded_blocks_equal_the_plain_ones(label, monkeypatch):
    torch.manual_seed(0)
    model = wu.seeded_engine(vit_config("vit_micro_patch8_32", "ait", act_layer="gelu_tanh"), torch.float64, "cpu")
    with torch.no_grad():  # non-trivial LayerNorms and deferred shifts, a residual stream with a large mean
        for block in model.blocks:
            for norm in (block.norm1, block.norm2):
                norm.weight.uniform_(0.5, 1.5), norm.bias.normal_(), norm.shift.normal_(mean=3.0)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = model(images)
        monkeypatch.setattr(fold_whatif.wg, "scaled_gemm", _gemm)
        monkeypatch.setattr(fold_whatif, "row_stats", _rstd)
        rstd = torch.empty(3 * model.cfg.seq_len, dtype=torch.float64)
        folds = fold_whatif.fold_blocks(model)
        flags = next(v[1:] for v in fold_whatif.VARIANTS if v[0] == label)
        monkeypatch.setattr(vt.Block, "forward", fold_whatif.block_forward(*flags, folds, rstd))
        got = model(images)
        # the check can fail: a fold that forgets the shift is wrong
        if flags[0] or flags[1]:
            for f in folds.values():
                for site in ("qkv", "fc1"):
                    f[site] = (*f[site][:2], torch.zeros_like(f[site][2]))
            wrong = model(images)
            assert not torch.allclose(wrong, want, rtol=1e-3, atol=1e-3)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()  # (reference() is float32)
