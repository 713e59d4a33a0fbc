"""The prototype GEMM with a per-token factor (tools/wgmma_gemm.py, perf-notes attempt 68): its
LayerNorm-fold algebra on the CPU, and its CUDA C++ source built for sm_90a by NVRTC (no GPU needed).
Its numbers on the GPU: `python3 tools/wgmma_gemm.py` checks them against float32 before timing."""
import os
import subprocess
import sys
import tempfile

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tools"))
import wgmma_gemm  # noqa: E402


@pytest.mark.parametrize("tokens,dim,out", [(197, 192, 576), (37, 384, 1536)])
def test_layer_norm_folds_into_a_row_scaled_gemm(tokens, dim, out):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.float64) * 3 + torch.randn(tokens, 1, generator=g) * 5
    gamma, beta = torch.randn(dim, generator=g, dtype=torch.float64), torch.randn(dim, generator=g, dtype=torch.float64)
    w, b = torch.randn(out, dim, generator=g, dtype=torch.float64), torch.randn(out, generator=g, dtype=torch.float64)
    eps = 1e-6
    want = F.layer_norm(x, (dim,), gamma, beta, eps) @ w.t() + b
    w2, b2 = wgmma_gemm.fold_layer_norm(gamma, beta, w, b)
    rstd = torch.rsqrt(x.var(dim=1, unbiased=False) + eps)
    got = wgmma_gemm.reference(x, w2, b2, rstd.float())
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # the check can fail: without the row-mean subtraction the fold is wrong
    wrong = wgmma_gemm.reference(x, (w * gamma[None, :]), b2, rstd.float())
    assert not torch.allclose(wrong.double(), want, rtol=1e-2, atol=1e-2 * want.abs().max().item())


def _sass(binary):
    import triton
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    if not os.access(nvdisasm, os.X_OK):
        pytest.skip("no nvdisasm beside Triton")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(binary)
        f.flush()
        done = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("dtype,gelu,cluster,schedule", [(torch.float16, False, 2, "coop"), (torch.bfloat16, True, 2, "coop"),
                                                         (torch.float16, True, 1, "coop"),
                                                         (torch.float16, True, 4, "pingpong")])
def test_wgmma_gemm_builds_without_spills(dtype, gelu, cluster, schedule):
    """Four m64n256k16 MMAs a K step, asynchronous (one wait allowing a group in flight), no local
    memory (128 accumulators a thread stay in registers), the epilogue in 16 stmatrix.x4, and the weight
    tile multicast to the cluster only where there is one."""
    try:
        from torch.cuda._utils import _nvrtc_compile
        _nvrtc_compile('extern "C" __global__ void probe() {}', "probe", "90a")
    except (ImportError, OSError, RuntimeError) as err:
        pytest.skip(f"no NVRTC here: {err}")
    code = wgmma_gemm.source(dtype, gelu, cluster, gelu, schedule)
    binary, name = _nvrtc_compile(code, "scaled_gemm", "90a", None, ["--use_fast_math"])
    sass = _sass(binary)
    assert sass.count("HGMMA.64x256x16.F32") == 4
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass
    assert "STL" not in sass and "LDL" not in sass
    assert sass.count("STSM.16.M88.4") == 16
    assert ("MULTICAST" in sass) == (cluster > 1)
    assert wgmma_gemm.SHARED_BYTES <= 227 * 1024 and wgmma_gemm.shared_bytes(schedule) <= wgmma_gemm.SHARED_BYTES
    with pytest.raises(RuntimeError):  # a broken source fails (the check above can fail)
        _nvrtc_compile(code.replace("wgmma.fence", "wgmma.fencex"), "scaled_gemm", "90a", None, ["--use_fast_math"])


def test_wgmma_gemm_refuses_what_it_cannot_run():
    x, w = torch.zeros(5, 64, dtype=torch.float16), torch.zeros(256, 64, dtype=torch.float16)
    for bad in (dict(w=torch.zeros(256, 96, dtype=torch.float16)), dict(x=torch.zeros(5, 96, dtype=torch.float16)),
                dict(w=torch.zeros(200, 64, dtype=torch.float16)), dict(w=w.bfloat16()), dict(x=torch.zeros(0, 64)),
                dict(bias=torch.zeros(256, dtype=torch.float16)), dict(row_scale=torch.zeros(4)),
                dict(out=torch.zeros(5, 256)), dict(cluster=3), dict(schedule="split")):
        args = dict(x=x, w=w) | bad
        with pytest.raises(ValueError, match="scaled_gemm wants"):
            wgmma_gemm.scaled_gemm(**args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_folded_weights_rounded_to_zero_sums_keep_a_large_mean_out(dtype):
    """Each folded row's rounded sum multiplies the token's mean inside the GEMM: with plain rounding a
    stream whose mean is 10 standard deviations loses bits (~7x the error of today's path, LayerNorm's
    rounded output times W); rounded to zero sums it stays at that error, and no entry moves more than one
    unit in the last place."""
    g = torch.Generator().manual_seed(3)
    tokens, dim, out = 64, 384, 512
    x = (torch.randn(tokens, dim, generator=g, dtype=torch.float64) + 10).to(dtype).double()
    gamma = torch.rand(dim, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(dim, generator=g, dtype=torch.float64) * 0.1
    w = (torch.randn(out, dim, generator=g, dtype=torch.float64) / dim ** 0.5).to(dtype)
    b = torch.randn(out, generator=g, dtype=torch.float64) * 0.1
    want = F.layer_norm(x, (dim,), gamma, beta, 1e-6) @ w.double().t() + b
    normed = F.layer_norm(x.float(), (dim,), gamma.float(), beta.float(), 1e-6).to(dtype).double()
    engine = (normed @ w.double().t() + b).to(dtype).double()  # today's path: a rounded normalized copy
    floor = ((engine - want).norm() / want.norm()).item()
    rstd = torch.rsqrt(x.var(dim=1, unbiased=False) + 1e-6)

    def error(w2, b2):
        got = (rstd[:, None] * (x @ w2.double().t()) + b2.double()).to(dtype).double()
        return ((got - want).norm() / want.norm()).item()
    w2, b2 = wgmma_gemm.fold_layer_norm(gamma, beta, w, b)
    exact = w.double() * gamma[None, :]
    exact = exact - exact.mean(dim=1, keepdim=True)
    plain = exact.to(dtype)
    assert error(w2, b2) < 1.15 * floor
    assert error(plain, b2) > 3 * floor  # the check can fail: plain rounding
    assert w2.double().sum(dim=1).abs().mean() < plain.double().sum(dim=1).abs().mean() / 10
    ulp = torch.maximum(*((wgmma_gemm._step(plain, torch.full_like(exact, d)).double() - plain.double()).abs()
                          for d in (1.0, -1.0)))  # (the larger step where a power of two lies between)
    assert bool(((w2.double() - exact).abs() <= ulp).all())
