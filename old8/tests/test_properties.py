"""Property-based tests: random small ViT shapes and inputs, each fused op and the whole engine
against its reference (TIMM's own model in float32 for the whole engine).

Shapes stay small: Triton runs on the CPU here through its interpreter (TRITON_INTERPRET=1).
"""
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weight_utils as wu
from engine.verify import compare
from modeling import ops
from modeling.config import vit_config

FEW = settings(max_examples=12, deadline=None, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
seeds = st.integers(0, 2**31 - 1)


def _randn(shape, seed, dtype=torch.float32, scale=1.0, offset=0.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale + offset).to(dtype)


@FEW
@given(rows=st.integers(1, 40), width=st.integers(1, 300), row_gap=st.integers(0, 9), row_step=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.float16]), with_shift=st.booleans(),
       eps=st.sampled_from([1e-6, 1e-5, 1e-3]), scale=st.floats(0.05, 20.0), offset=st.floats(-3.0, 3.0), seed=seeds)
def test_triton_layer_norm_with_shift_and_strided_rows(rows, width, row_gap, row_step, dtype, with_shift, eps,
                                                       scale, offset, seed):
    # a (rows, width) view whose rows are `width + row_gap` apart and every `row_step`-th row of a bigger tensor
    base = _randn((rows * row_step, width + row_gap), seed, dtype, scale, offset)
    x = base[::row_step, :width]
    w, b, shift = (_randn(width, seed + i) for i in (1, 2, 3))
    shift = shift if with_shift else None
    got = ops.layer_norm(x, w, b, eps, shift, impl="triton")
    want = ops.layer_norm_reference(x, w, b, eps, shift)
    assert got.dtype == dtype and got.shape == (rows, width) and got.is_contiguous()
    tol = 1e-4 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    assert torch.equal(base, _randn((rows * row_step, width + row_gap), seed, dtype, scale, offset))  # input untouched


@FEW
@given(batch=st.integers(1, 3), chans=st.integers(1, 4), ph=st.integers(1, 6), pw=st.integers(1, 6),
       gh=st.integers(1, 4), gw=st.integers(1, 4), dim=st.integers(1, 16), bias=st.booleans(), seed=seeds)
def test_patchify_gemm_matches_convolution(batch, chans, ph, pw, gh, gw, dim, bias, seed):
    images = _randn((batch, chans, gh * ph, gw * pw), seed)
    w4 = _randn((dim, chans, ph, pw), seed + 1)
    b = _randn(dim, seed + 2) if bias else None
    rows = ops.patchify(images, (ph, pw))
    assert rows.shape == (batch * gh * gw, chans * ph * pw)
    got = F.linear(rows, w4.reshape(dim, -1), b).view(batch, gh * gw, dim)
    torch.testing.assert_close(got, ops.patch_embed_reference(images, w4, b), atol=1e-4, rtol=1e-4)


@FEW
@given(batch=st.integers(1, 3), seq=st.integers(1, 40), heads=st.integers(1, 4), head_dim=st.integers(1, 24),
       scale=st.floats(0.1, 4.0), seed=seeds)
def test_attention_on_fused_qkv_matches_reference(batch, seq, heads, head_dim, scale, seed):
    qkv = _randn((batch * seq, 3 * heads * head_dim), seed, scale=scale)
    got = ops.attention(qkv, batch, heads, head_dim)
    want = ops.attention_reference(qkv, batch, heads, head_dim)
    assert got.shape == (batch * seq, heads * head_dim)
    # float32 rounding of the scores grows with their size (~scale^2 * sqrt(hd)); softmax passes it on
    logit_size = max(1.0, scale ** 2 * head_dim ** 0.5 / 4)
    torch.testing.assert_close(got, want, atol=1e-5 * logit_size, rtol=1e-4)


@FEW
@given(rows=st.integers(1, 60), in_dim=st.integers(1, 48), out_dim=st.integers(1, 48), seed=seeds)
def test_residual_linear_matches_reference(rows, in_dim, out_dim, seed):
    x, a, w = _randn((rows, out_dim), seed), _randn((rows, in_dim), seed + 1), _randn((out_dim, in_dim), seed + 2)
    want = ops.residual_linear_reference(x, a, w)
    x_before = x.clone()
    torch.testing.assert_close(ops.residual_linear(x, a, w, "add"), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(x, x_before)  # "add" is out of place
    got = ops.residual_linear(x, a, w, "addmm")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert got.data_ptr() == x.data_ptr()  # "addmm" accumulates into the residual in place


@st.composite
def vit_kwargs(draw):
    """TIMM overrides of a small ViT: every configuration switch the engine implements."""
    heads = draw(st.integers(1, 3))
    ph, pw = draw(st.sampled_from([(2, 2), (4, 4), (8, 8), (4, 8), (3, 5)]))
    gh, gw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    class_token = draw(st.booleans())
    pools = ["avg", "max", "avgmax"] + (["token"] if class_token else [])
    return dict(
        img_size=(gh * ph, gw * pw), patch_size=(ph, pw), in_chans=draw(st.integers(1, 3)),
        embed_dim=heads * draw(st.sampled_from([4, 8, 12])), num_heads=heads, depth=draw(st.integers(1, 2)),
        mlp_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])), num_classes=draw(st.integers(2, 12)),
        class_token=class_token, reg_tokens=draw(st.integers(0, 2)), global_pool=draw(st.sampled_from(pools)),
        pool_include_prefix=draw(st.booleans()), no_embed_class=draw(st.booleans()),
        pos_embed=draw(st.sampled_from(["learn", "learn", "none"])),
        init_values=draw(st.sampled_from([None, 0.5])),  # layer scale
        qkv_bias=draw(st.booleans()), proj_bias=draw(st.booleans()), pre_norm=draw(st.booleans()),
        fc_norm=draw(st.sampled_from([None, True, False])), final_norm=draw(st.booleans()),
        act_layer=draw(st.sampled_from(["gelu", "gelu_tanh"])),
    )


@settings(max_examples=15, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=vit_kwargs(), batch=st.integers(1, 3), seed=seeds)
def test_whole_engine_matches_timm(kwargs, batch, seed):
    cfg = vit_config("vit_micro_patch8_32", **kwargs)
    timm_model, _ = wu.source_model(cfg, seed=seed % 1000)
    model = wu.build_engine(cfg, wu.convert(timm_model, cfg), torch.float32, "cpu")
    images = _randn((batch, cfg.in_chans, *cfg.img_size), seed)
    with torch.no_grad():
        want = timm_model(images)
        for plan in (ops.Plan(), ops.Plan(norm="triton", residual="addmm")):
            got = model.set_plan(plan)(images)
            report = compare(got, want, torch.float32)
            assert report.passed, f"{plan}: {report.failures}; {cfg}"
