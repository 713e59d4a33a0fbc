"""Quick GPU checks of facts the engine relies on: each fused op on CUDA against its reference,
which GELU the cuBLASLt epilogue computes, and whether each SDPA backend's output is laid out
(B, T, H, hd) so the reshape after attention is free."""
import torch

import modeling  # noqa: F401
from modeling import ops

dev = "cuda"
torch.manual_seed(0)
for dtype in (torch.float16, torch.bfloat16):
    x = torch.randn(197 * 8, 768, device=dev, dtype=dtype) * 2
    w, b, s = (torch.randn(768, device=dev) for _ in range(3))
    err = (ops.layer_norm(x, w, b, 1e-6, s, "triton").float() - ops.layer_norm_reference(x, w, b, 1e-6, s).float()).abs().max()
    print(f"triton layer_norm {dtype}: max abs err {err:.2e}")
    xx, ww, bb = torch.randn(300, 768, device=dev, dtype=dtype), torch.randn(3072, 768, device=dev, dtype=dtype) / 28, torch.randn(3072, device=dev, dtype=dtype)
    epi = ops.linear_gelu(xx, ww, bb, "gelu", "epilogue").float()
    d_tanh = (epi - ops.linear_gelu_reference(xx.float(), ww.float(), bb.float(), "gelu_tanh")).abs().max()
    d_erf = (epi - ops.linear_gelu_reference(xx.float(), ww.float(), bb.float(), "gelu")).abs().max()
    print(f"gelu epilogue {dtype}: vs tanh {d_tanh:.2e}, vs erf {d_erf:.2e}")
    qkv = torch.randn(4 * 197, 3 * 768, device=dev, dtype=dtype)
    ref = ops.attention_reference(qkv, 4, 12, 64).float()
    for backend in ("cudnn", "flash", "efficient", "math"):
        try:
            with ops.sdpa_backend(backend):
                q, k, v = ops.split_qkv(qkv, 4, 12, 64)
                raw = torch.nn.functional.scaled_dot_product_attention(q, k, v)
                out = ops.attention(qkv, 4, 12, 64).float()
            free = raw.transpose(1, 2).is_contiguous()
            print(f"sdpa {backend} {dtype}: err {(out - ref).abs().max():.2e}, output (B,T,H,hd) layout: {free}")
        except RuntimeError as e:
            print(f"sdpa {backend} {dtype}: unavailable ({str(e).splitlines()[0][:80]})")

# our Triton GEMM (every candidate tile) and attention tiles, float16 and bfloat16, on the GPU
from modeling import kernels  # noqa: E402
for dtype in (torch.float16, torch.bfloat16):
    a, w, b = (torch.randn(*s, device=dev, dtype=dtype) for s in ((197 * 3, 768), (2304, 768), (2304,)))
    w /= 28
    want = ops.linear(a.float(), w.float(), b.float())
    for tile in kernels.GEMM_TILE_CANDIDATES:
        stream = torch.randn(197 * 3, 2304, device=dev, dtype=dtype)
        try:
            acc = ops.residual_linear(stream.clone(), a, w, "add", tile).float()
            err = f"{((acc - stream.float() - want + b.float()).norm() / want.norm()):.1e}"
        except Exception as e:  # noqa: BLE001 (shared memory, on another GPU)
            err = type(e).__name__
        if ops.parse_gemm_tile(tile).split_k > 1:  # split K: the in-place residual GEMMs only
            print(f"triton gemm {tile} {dtype}: in place {err}")
            continue
        got = ops.linear(a, w, b, tile).float()
        tanh = ops.linear_gelu(a, w, b, "gelu", "triton", tile).float()  # the GPU's tanh instruction
        want_tanh = ops.linear_gelu_reference(a.float(), w.float(), b.float(), "gelu_tanh")
        print(f"triton gemm {tile} {dtype}: rel err {((got - want).norm() / want.norm()):.1e}, in place {err}, "
              f"gelu(tanh) {((tanh - want_tanh).norm() / want_tanh.norm()):.1e}")
    qkv = torch.randn(3 * 577, 3 * 1024, device=dev, dtype=dtype)
    ref = ops.attention_reference(qkv, 3, 16, 64).float()
    for tile in kernels.attention_tiles(3, 577, 64, torch.device(dev)):
        out = ops.attention(qkv, 3, 16, 64, "triton", str(tile)).float()
        print(f"triton attention {tile} {dtype}: rel err {((out - ref).norm() / ref.norm()):.1e}")
    for batch, seq, heads in ((3, 196, 12), (5, 37, 3), (2, 256, 2), (4, 129, 5)):  # odd sizes, <= 256 tokens
        qkv = torch.randn(batch * seq, 3 * heads * 64, device=dev, dtype=dtype)
        ref = ops.attention_reference(qkv, batch, heads, 64).float()
        out = ops.attention(qkv, batch, heads, 64, "cuda").float()
        print(f"cuda attention T={seq} H={heads} B={batch} {dtype}: rel err {((out - ref).norm() / ref.norm()):.1e}")

# cuBLASLt's algorithms (modeling/cublaslt.py) at odd sizes: every one the heuristic offers and each of
# cublaslt.EXTRA_CONFIGS that cuBLASLt accepts there and the heuristic did not offer, in every
# form the plan uses, against float32, with 256-byte-aligned operands as the engine's arena gives
from modeling import cublaslt  # noqa: E402
for dtype in (torch.float16, torch.bfloat16):
    m, n, k = 197 * 3, 1000, 392
    a, w, b = (torch.randn(*s, device=dev, dtype=dtype) for s in ((m, k), (n, k), (n,)))
    w /= 20
    lin = ops.linear(a.float(), w.float(), b.float())
    for form, epilogue, residual, want in (
            ("bias", "bias", False, lin),
            ("gelu_bias", "gelu_bias", False, ops.gelu(lin, "gelu_tanh")),
            ("+=", "none", True, None)):
        problem = cublaslt.Problem(m, n, k, dtype, epilogue, residual)
        errs = []
        for tile in cublaslt.names(problem):  # the extra configurations: those valid here
            stream = torch.randn(m, n, device=dev, dtype=dtype)
            if residual:
                got = ops.residual_linear(stream.clone(), a, w, "addmm", tile).float()
                want = stream.float() + lin - b.float()
            elif epilogue == "bias":
                got = ops.linear(a, w, b, tile).float()
            else:
                got = ops.linear_gelu(a, w, b, "gelu", "epilogue", tile).float()
            errs.append(f"{tile} {((got - want).norm() / want.norm()):.1e}")
        print(f"cublaslt {form} {dtype} ({m}x{n}x{k}): {', '.join(errs)}")

# two graphs captured on different streams may replay at once (tools/two_streams.py): each stream
# needs its own cuBLASLt workspace, or the replays race (perf-notes attempt 43)
streams = (torch.cuda.Stream(dev), torch.cuda.Stream(dev))
ptrs = {cublaslt._workspace(torch.cuda.current_device(), 1 << 20, s.cuda_stream).data_ptr() for s in streams}
print(f"cublaslt workspace per stream: {'distinct' if len(ptrs) == 2 else 'SHARED (race)'}")
