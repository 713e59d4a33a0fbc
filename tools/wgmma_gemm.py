"""A Hopper GEMM of our own in CUDA C++ (NVRTC), with a per-token factor in its epilogue: the piece
a LayerNorm fold needs and cuBLASLt does not offer for 16-bit types (perf-notes attempts 67-68).

    y = act(row_scale[:, None] * (x @ w^T) + bias)      x (M, K), w (N, K), y (M, N); act: none or GELU(tanh)

With x the raw residual stream, w = W diag(gamma) less each row's mean and row_scale = 1/std of each
token, y is LN(x) W^T + b with no normalized copy written (attempt 59's algebra). It only pays if this
GEMM spends no more energy than cuBLAS's: this prototype measures how far it is.

The kernel: persistent, one CTA per SM, 128 x 256 output tiles, K in steps of 64. Warp 8 loads A and B
tiles by TMA (128-byte swizzle) into a ring of STAGES stages; warpgroups 0 and 1 each take 64 rows of
the tile with wgmma m64n256k16 (A and B from shared memory, 128 float32 accumulators a thread), release
each stage once the MMAs that read it are done, then scale, add the bias, apply GELU and write the tile
through shared memory in 64 x 64 pieces by TMA stores (two buffers a warpgroup, so a piece is written
while the last one leaves). Tiles go n-fastest, so the tiles of one block of rows read their A from L2.
K must be a multiple of 64 and N of 256; rows past M are read as zeros and not written.

    timeout -s KILL 150 python3 tools/wgmma_gemm.py [MODEL:BATCH]
        numbers against float32 at odd sizes (one with more tiles than SMs), then the qkv and fc1 shapes
        checked and timed beside cuBLAS, short and sustained (about a minute; never run yet, and a wrong
        barrier phase would spin forever, hence the timeout)
"""
import functools
import sys

import torch
import torch.nn.functional as F

from modeling import cuda_attention

BM, BN, BK, STAGES = 128, 256, 64, 4
THREADS = 288                       # two consumer warpgroups and one producer warp
STAGE_BYTES = (BM + BN) * BK * 2
OUT_BYTES = 2 * 2 * 64 * 64 * 2     # two 64 x 64 output buffers per consumer warpgroup
SHARED_BYTES = 1024 + STAGES * STAGE_BYTES + OUT_BYTES + 2 * STAGES * 8


def source(dtype: torch.dtype = torch.float16, gelu: bool = False) -> str:
    kind = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    return rf"""
#define BM {BM}
#define BN {BN}
#define BK {BK}
#define STAGES {STAGES}
#define STAGE_BYTES {STAGE_BYTES}
#define A_BYTES {BM * BK * 2}
#define GELU {int(gelu)}
#define KIND "{kind}"

__device__ __forceinline__ unsigned smem_u32(const void* p) {{
    unsigned long long s;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(s) : "l"(p));
    return (unsigned)s;
}}

__device__ __forceinline__ unsigned long long desc_sw128(unsigned addr) {{
    // wgmma shared-memory descriptor, 128-byte swizzle: 8-row groups 1024 bytes apart (SBO), LBO unused
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | (64ull << 32) | (1ull << 62);
}}

__device__ __forceinline__ void wait_phase(unsigned bar, unsigned phase) {{
    unsigned done = 0;
    while (!done)
        asm volatile("{{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}}\n"
                     : "=r"(done) : "r"(bar), "r"(phase) : "memory");
}}

__device__ __forceinline__ void arrive(unsigned bar) {{
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
}}

__device__ __forceinline__ void tma_load(unsigned dst, const void* map, int c0, int c1, unsigned bar) {{
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {{%2, %3, %4}}], [%5];\n"
                 :: "r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(0), "r"(bar) : "memory");
}}

__device__ __forceinline__ void tma_store(const void* map, unsigned src, int c0, int c1) {{
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {{%1, %2, %3}}], [%4];\n"
                 :: "l"(map), "r"(c0), "r"(c1), "r"(0), "r"(src) : "memory");
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}}

__device__ __forceinline__ unsigned pack2(float lo, float hi) {{
    unsigned r;
    asm("cvt.rn." KIND "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}}

__device__ __forceinline__ float act(float v) {{
    if (!GELU) return v;
    float t;
    asm("tanh.approx.f32 %0, %1;" : "=f"(t) : "f"(0.7978845608f * fmaf(0.044715f * v, v * v, v)));
    return 0.5f * v * (1.f + t);
}}

extern "C" __global__ void __launch_bounds__(288, 1) scaled_gemm(const void* map_a, const void* map_b, const void* map_o,
        const float* row_scale, const float* bias, int m_rows, int n_cols, int k_depth, int has_scale, int has_bias) {{
    extern __shared__ unsigned char raw_smem[];
    unsigned base = (smem_u32(raw_smem) + 1023) & ~1023u;    // 128-byte swizzled tiles want 1024-byte alignment
    unsigned out_smem = base + STAGES * STAGE_BYTES;
    unsigned full = out_smem + 4 * 8192, empty = full + 8 * STAGES;
    int t = threadIdx.x, warp = t / 32, lane = t % 32;
    int tiles_n = n_cols / BN, tiles = (m_rows + BM - 1) / BM * tiles_n, k_steps = k_depth / BK;
    if (t == 0) {{
        for (int s = 0; s < STAGES; ++s) {{
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" :: "r"(full + 8 * s) : "memory");
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 2;\n" :: "r"(empty + 8 * s) : "memory");
        }}
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }}
    __syncthreads();
    if (warp == 8) {{                                        // the producer: one thread issues every load
        if (lane == 0) {{
            int it = 0;
            for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {{
                int m0 = tile / tiles_n * BM, n0 = tile % tiles_n * BN;
                for (int kb = 0; kb < k_steps; ++kb, ++it) {{
                    int s = it % STAGES;
                    unsigned stage = base + s * STAGE_BYTES;
                    wait_phase(empty + 8 * s, ((it / STAGES) & 1) ^ 1);   // a fresh barrier passes parity 1
                    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
                                 :: "r"(full + 8 * s), "r"(STAGE_BYTES) : "memory");
                    tma_load(stage, map_a, kb * BK, m0, full + 8 * s);
                    tma_load(stage + A_BYTES, map_b, kb * BK, n0, full + 8 * s);
                }}
            }}
        }}
        return;
    }}
    int wg = t / 128, w = (t % 128) / 32;
    int it = 0, piece = 0;
    for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {{
        int m0 = tile / tiles_n * BM, n0 = tile % tiles_n * BN;
        float acc[128];
        int s = 0;
        for (int kb = 0; kb < k_steps; ++kb, ++it) {{
            s = it % STAGES;
            unsigned stage = base + s * STAGE_BYTES;
            wait_phase(full + 8 * s, (it / STAGES) & 1);
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
            #pragma unroll
            for (int k = 0; k < 4; ++k) {{
                unsigned long long da = desc_sw128(stage + wg * 8192 + 32 * k);
                unsigned long long db = desc_sw128(stage + A_BYTES + 32 * k);
                asm volatile(
                    "{{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                    "wgmma.mma_async.sync.aligned.m64n256k16.f32." KIND "." KIND " {{{cuda_attention._operands(0, 128)}}}, "
                    "%128, %129, p, 1, 1, 0, 0;\n}}\n"
                    : {cuda_attention._acc_constraints("acc", 128)}
                    : "l"(da), "l"(db), "r"(kb * 4 + k));
            }}
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            if (kb > 0) {{                                   // the step before this one is done with its stage
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                if (t % 128 == 0) arrive(empty + 8 * ((it - 1) % STAGES));
            }}
        }}
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        if (t % 128 == 0) arrive(empty + 8 * s);
        // epilogue: this thread holds rows r and r + 8 of the warpgroup's 64, columns 8c + 2(lane % 4) + {{0, 1}}
        int r = 16 * w + lane / 4, row = m0 + wg * 64 + r;
        float sc0 = 1.f, sc1 = 1.f;
        if (has_scale) {{
            sc0 = row < m_rows ? row_scale[row] : 0.f;
            sc1 = row + 8 < m_rows ? row_scale[row + 8] : 0.f;
        }}
        #pragma unroll
        for (int j = 0; j < 4; ++j, ++piece) {{              // 64-column pieces, through two buffers
            unsigned buf = out_smem + (wg * 2 + (piece & 1)) * 8192;
            if (t % 128 == 0)
                asm volatile("cp.async.bulk.wait_group.read 1;\n" ::: "memory");
            asm volatile("bar.sync %0, 128;\n" :: "r"(1 + wg) : "memory");
            #pragma unroll
            for (int cc = 0; cc < 8; ++cc) {{
                int c = 8 * j + cc, col = n0 + 8 * c + 2 * (lane % 4);
                float b0 = 0.f, b1 = 0.f;
                if (has_bias) {{ b0 = bias[col]; b1 = bias[col + 1]; }}
                unsigned at = buf + r * 128 + ((cc ^ (r & 7)) << 4) + (lane % 4) * 4;
                asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(at),
                             "r"(pack2(act(fmaf(acc[4 * c], sc0, b0)), act(fmaf(acc[4 * c + 1], sc0, b1)))) : "memory");
                asm volatile("st.shared.u32 [%0], %1;\n" :: "r"(at + 1024),
                             "r"(pack2(act(fmaf(acc[4 * c + 2], sc1, b0)), act(fmaf(acc[4 * c + 3], sc1, b1)))) : "memory");
            }}
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // visible to the TMA unit
            asm volatile("bar.sync %0, 128;\n" :: "r"(1 + wg) : "memory");
            if (t % 128 == 0)
                tma_store(map_o, buf, n0 + 64 * j, m0 + wg * 64);
        }}
    }}
    if (t % 128 == 0)                                        // shared memory lives until the stores read it
        asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}}
"""


@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, gelu: bool, device_index: int):
    return cuda_attention.build(source(dtype, gelu), "scaled_gemm", SHARED_BYTES, device_index)


def scaled_gemm(x, w, bias=None, row_scale=None, gelu=False, out=None):
    """act(row_scale[:, None] * (x @ w^T) + bias) by the kernel above; bias and row_scale float32."""
    (m, k), n = x.shape, w.shape[0]
    if not (m and k and n) or k % BK or n % BN or w.shape[1] != k or w.dtype != x.dtype \
            or not (x.is_contiguous() and w.is_contiguous()):
        raise ValueError(f"scaled_gemm wants contiguous x (M, K), w (N, K) of one dtype, K % {BK} == 0, N % {BN} == 0")
    for vector, length in ((bias, n), (row_scale, m)):
        if vector is not None and (vector.dtype != torch.float32 or vector.shape != (length,) or not vector.is_contiguous()):
            raise ValueError("scaled_gemm wants bias (N,) and row_scale (M,) contiguous float32")
    out = torch.empty(m, n, device=x.device, dtype=x.dtype) if out is None else out
    if out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("scaled_gemm wants out (M, N) contiguous, of x's dtype")
    maps = (cuda_attention._tensor_map(x.view(1, m, k), BM), cuda_attention._tensor_map(w.view(1, n, k), BN),
            cuda_attention._tensor_map(out.view(1, m, n), 64))
    dummy = out  # never read where its flag is off
    tiles = -(-m // BM) * (n // BN)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    _kernel(x.dtype, gelu, x.device.index or 0)(
        grid=(min(tiles, sms), 1, 1), block=(THREADS, 1, 1),
        args=[*maps, dummy if row_scale is None else row_scale, dummy if bias is None else bias, m, n, k,
              int(row_scale is not None), int(bias is not None)], shared_mem=SHARED_BYTES)
    return out


def fold_layer_norm(gamma, beta, w, b):
    """LN(x) @ w^T + b == rstd(x)[:, None] * (x @ w2^T) + b2 (float64 here): w2 = w diag(gamma) less each
    row's mean (so x's own mean drops out inside the GEMM), b2 = w beta + b. Returns (w2 in w's dtype, b2
    float32); rstd(x) = 1 / sqrt(var(x) + eps) per row is what a statistics pass still computes."""
    w64 = w.double() * gamma.double()[None, :]
    w2 = w64 - w64.mean(dim=1, keepdim=True)
    return w2.to(w.dtype), (w.double() @ beta.double() + b.double()).float()


def reference(x, w, bias=None, row_scale=None, gelu=False):
    y = x.float() @ w.float().t()
    if row_scale is not None:
        y = y * row_scale[:, None]
    if bias is not None:
        y = y + bias
    return F.gelu(y, approximate="tanh") if gelu else y


def check():
    """Relative errors against float32 at odd row counts, both dtypes, with and without each part."""
    ok = True
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float16, torch.bfloat16):
        for m, n, k, scaled, biased, gelu in ((392, 2304, 768, True, True, False), (197, 256, 64, False, False, False),
                                              (1000, 3072, 768, True, True, True), (129, 768, 3072, False, True, False),
                                              (4100, 3072, 768, True, True, True)):  # 396 tiles: CTAs take several
            x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
            w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
            bias = torch.randn(n, device="cuda", generator=g) if biased else None
            scale = torch.rand(m, device="cuda", generator=g) * 4 + 0.05 if scaled else None
            y = scaled_gemm(x, w, bias, scale, gelu, torch.full((m, n), float("nan"), device="cuda", dtype=dtype))
            torch.cuda.synchronize()  # (NaN-filled: a piece never written fails)
            ref = reference(x, w, bias, scale, gelu)
            plain = reference(x, w, bias, scale, gelu).to(dtype).float()  # rounding the output alone
            err = ((y.float() - ref).norm() / ref.norm()).item()
            floor = ((plain - ref).norm() / ref.norm()).item()
            good = bool(torch.isfinite(y).all()) and err < 4 * floor + 1e-4
            ok = ok and good
            print(f"{str(dtype)[6:]:8s} M {m:5d} N {n:5d} K {k:5d} scale {int(scaled)} bias {int(biased)} gelu {int(gelu)}: "
                  f"relative error {err:.2e} (output rounding alone {floor:.2e}) {'ok' if good else 'WRONG'}", flush=True)
    return ok


def compare(spec):
    """qkv (bias) and fc1 (bias + GELU) at MODEL:BATCH: this kernel (with a row scale) beside cuBLASLt's
    algorithms for the same GEMM without one, short timings, then the fastest of each sustained."""
    from engine.compile import capture_graph, graphed_ms
    from modeling import cublaslt as lt
    from modeling.config import vit_config
    from power_probe import Nvml, sustain
    name, batch = spec.split(":")
    cfg = vit_config(name, "ait")
    m, k, dev = int(batch) * cfg.seq_len, cfg.embed_dim, torch.device("cuda")
    nvml = Nvml(torch.cuda.current_device())
    for site, n, gelu in (("qkv", 3 * cfg.embed_dim, False), ("fc1", cfg.mlp_hidden, True)):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).half()
        bias, scale = torch.randn(n, device="cuda"), torch.rand(m, device="cuda") + 0.5
        bias16, out = bias.half(), torch.empty(m, n, device="cuda", dtype=torch.float16)
        problem = lt.Problem(m, n, k, torch.float16, "gelu_bias" if gelu else "bias")
        runs = {f"cublas lt{i}": (lambda a=a, b=b: lt.run(problem, a, b, x, w, bias16, out))
                for i, (a, b) in enumerate(lt.algorithms(problem))}
        runs["ours"] = lambda: scaled_gemm(x, w, bias, scale, gelu, out)
        runs["ours"]()  # the tensor maps are made outside capture
        ref = reference(x, w, bias, scale, gelu)
        err = ((out.float() - ref).norm() / ref.norm()).item()
        print(f"{spec} {site} ours: relative error {err:.2e} against float32", flush=True)
        del ref
        flops = 2 * m * n * k
        short = {label: graphed_ms(fn, dev, budget_s=0.15) for label, fn in runs.items()}
        for label, ms in short.items():
            print(f"{spec} {site} {label:12s} {ms * 1e3:8.1f} us short, {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
        best = min((ms, label) for label, ms in short.items() if label != "ours")[1]
        for round_ in range(2):
            for label in (best, "ours"):
                graph, _ = capture_graph(lambda: [runs[label]() for _ in range(10)])
                sustain(nvml, graph.replay, 10, f"{site} {label} round {round_ + 1}")


def main(argv):
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if check():
        compare(argv[0] if argv else "vit_base_patch16_224:256")
    else:
        sys.exit("scaled_gemm: wrong numbers, not timed")


if __name__ == "__main__":
    main(sys.argv[1:])
