"""A Hopper GEMM of our own in CUDA C++ (NVRTC), with a per-token factor in its epilogue: the piece
a LayerNorm fold needs and cuBLASLt does not offer for 16-bit types (perf-notes attempts 67-69).

    y = act(row_scale[:, None] * (x @ w^T + shift) + bias)   x (M, K), w (N, K), y (M, N); act: none or GELU(tanh)

With x the raw residual stream, w = W diag(gamma) less each row's mean, shift = w s (s: the engine's
deferred biases) and row_scale = 1/std of each token, y is LN(x + s) W^T + b with no normalized copy
written (attempt 59's algebra; tools/fold_whatif.py). It only pays if this GEMM spends no more energy
than cuBLAS's: this prototype measures how far it is.

The kernel: persistent, one CTA per SM (or per cluster of 2 or 4 CTAs), output tiles 256 columns
wide, K in steps of 64. Warp 8 loads the activation and weight tiles by TMA (128-byte swizzle) into a
ring of 3 stages; in a cluster each CTA loads a share of the weight tile and multicasts it to all, so
the weights cross L2 once for the cluster's neighbouring row blocks. Two consumer warpgroups run wgmma
m64n256k16 (128 float32 accumulators a thread), releasing each stage once the MMAs that read it are
done. Schedules: "coop", both warpgroups on one 128-row unit (64 rows each); "pingpong", each
warpgroup on its own 64-row units in turn, so one's epilogue runs under the other's MMAs. The epilogue
takes the bias, shift and row scales fetched during the MMAs, applies GELU, and writes the warpgroup's
64 x 256 by stmatrix into a staging buffer that TMA stores drain while the next unit computes. Units go
n-fastest, so one block of rows reads its activations from L2. K must be a multiple of 64 and N of 256;
rows past M are read as zeros and not written.

    timeout -s KILL 200 python3 tools/wgmma_gemm.py [MODEL:BATCH]
        numbers against float32 at odd sizes (one with more tiles than SMs, one row block past M) for
        every variant in both dtypes, then qkv and fc1 timed beside cuBLASLt's algorithms and the engine's
        extra configurations, short and sustained; ends with "best variant SCHEDULE:CLUSTER", the one
        with the least energy. (A wrong barrier phase would spin forever, hence the timeout.)
"""
import ctypes
import functools
import itertools
import statistics
import sys

import torch
import torch.nn.functional as F

from modeling import cuda_attention

BM, BN, BK, STAGES = 128, 256, 64, 3
THREADS = 288                       # two consumer warpgroups and one producer warp
OUT_BYTES = BM * BN * 2             # 64 x 256 output staged per warpgroup for its TMA stores
BIAS_BYTES = 2 * BN * 8             # the tile's bias and shift, one copy per consumer warpgroup
CLUSTERS = (1, 2, 4)                # CTAs a cluster: each shares the weight tile with the others' row blocks
SCHEDULES = ("coop", "pingpong")    # both warpgroups on one 128-row unit, or each on its own 64-row units


def unit_rows(schedule: str) -> int:
    return BM if schedule == "coop" else BM // 2


def stage_bytes(schedule: str) -> int:
    return (unit_rows(schedule) + BN) * BK * 2


def shared_bytes(schedule: str) -> int:
    return 1024 + STAGES * stage_bytes(schedule) + OUT_BYTES + BIAS_BYTES + 2 * STAGES * 8 + 2 * 8


SHARED_BYTES = max(shared_bytes(s) for s in SCHEDULES)
VARIANTS = (("coop", 1), ("coop", 2), ("coop", 4), ("pingpong", 1), ("pingpong", 2), ("pingpong", 4))  # what check and compare run


def _epilogue(shift: bool) -> str:
    """The epilogue's 16 steps, unrolled here so each address is a base register plus an immediate: step c
    takes 8-column groups c and c + 1 (their bias, and shift if any, from shared memory), shifts, scales,
    biases, activates, rounds and writes them by one stmatrix.x4 into the swizzled 64 x 64 piece c // 8."""
    steps = []
    pair = 16 if shift else 8  # bytes a column pair takes in shared memory: (bias, bias[, shift, shift])
    for c in range(0, 32, 2):
        v = lambda i, name: f"acc[{4 * c + i}] + {name}" if shift else f"acc[{4 * c + i}]"  # noqa: E731
        loads = (rf"""float c0, c1, d0, d1, h0, h1, e0, e1;
                asm volatile("ld.shared.v4.f32 {{%0, %1, %2, %3}}, [%8+{4 * pair * c}];\n"
                             "ld.shared.v4.f32 {{%4, %5, %6, %7}}, [%8+{4 * pair * c + 4 * pair}];\n"
                             : "=f"(c0), "=f"(c1), "=f"(h0), "=f"(h1), "=f"(d0), "=f"(d1), "=f"(e0), "=f"(e1)
                             : "r"(bias_at) : "memory");""" if shift else rf"""float c0, c1, d0, d1;
                asm volatile("ld.shared.v2.f32 {{%0, %1}}, [%4+{4 * pair * c}];\n"
                             "ld.shared.v2.f32 {{%2, %3}}, [%4+{4 * pair * c + 4 * pair}];\n"
                             : "=f"(c0), "=f"(c1), "=f"(d0), "=f"(d1) : "r"(bias_at) : "memory");""")
        steps.append(rf"""            {{
                {loads}
                unsigned r0 = pack2(act(fmaf({v(0, "h0")}, sc0, c0)), act(fmaf({v(1, "h1")}, sc0, c1)));
                unsigned r1 = pack2(act(fmaf({v(2, "h0")}, sc1, c0)), act(fmaf({v(3, "h1")}, sc1, c1)));
                unsigned r2 = pack2(act(fmaf({v(4, "e0")}, sc0, d0)), act(fmaf({v(5, "e1")}, sc0, d1)));
                unsigned r3 = pack2(act(fmaf({v(6, "e0")}, sc1, d0)), act(fmaf({v(7, "e1")}, sc1, d1)));
                asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0+{c // 8 * 8192}], {{%1, %2, %3, %4}};\n"
                             :: "r"(st_at[{c % 8 // 2}]), "r"(r0), "r"(r1), "r"(r2), "r"(r3) : "memory");
            }}""")
    return "\n".join(steps)


def source(dtype: torch.dtype = torch.float16, gelu: bool = False, cluster: int = 2, shift: bool = False,
           schedule: str = "coop") -> str:
    kind = {torch.float16: "f16", torch.bfloat16: "bf16"}[dtype]
    return rf"""
#define UNIT_ROWS {unit_rows(schedule)}
#define PINGPONG {int(schedule == "pingpong")}
#define OUT_BYTES {OUT_BYTES}
#define BN {BN}
#define BK {BK}
#define STAGES {STAGES}
#define STAGE_BYTES {stage_bytes(schedule)}
#define A_BYTES {unit_rows(schedule) * BK * 2}
#define GELU {int(gelu)}
#define CLUSTER {cluster}
#define SHIFT {int(shift)}
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

__device__ __forceinline__ void release_stage(unsigned bar) {{
    // every CTA of the cluster writes into this stage (the shared weight tile), so each hears of its release
    if (CLUSTER == 1) {{
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(bar) : "memory");
        return;
    }}
    #pragma unroll
    for (unsigned cta = 0; cta < CLUSTER; ++cta)
        asm volatile("{{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
                     "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}}\n"
                     :: "r"(bar), "r"(cta) : "memory");
}}

__device__ __forceinline__ void cluster_sync() {{
    if (CLUSTER > 1)
        asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
    else
        __syncthreads();
}}

__device__ __forceinline__ void tma_load(unsigned dst, const void* map, int c0, int c1, unsigned bar) {{
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {{%2, %3, %4}}], [%5];\n"
                 :: "r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(0), "r"(bar) : "memory");
}}

__device__ __forceinline__ void tma_load_all(unsigned dst, const void* map, int c0, int c1, unsigned bar) {{
    // the same box into every CTA of the cluster, at the same offsets, each CTA's own barrier told
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {{%2, %3, %4}}], [%5], %6;\n"
                 :: "r"(dst), "l"(map), "r"(c0), "r"(c1), "r"(0), "r"(bar), "h"((unsigned short)((1 << CLUSTER) - 1))
                 : "memory");
}}

__device__ __forceinline__ void tma_store(const void* map, unsigned src, int c0, int c1) {{
    asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {{%1, %2, %3}}], [%4];\n"
                 :: "l"(map), "r"(c0), "r"(c1), "r"(0), "r"(src) : "memory");
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

extern "C" __global__ void __launch_bounds__(288, 1) __cluster_dims__(CLUSTER, 1, 1) scaled_gemm(
        const void* map_a, const void* map_b, const void* map_o, const float* row_scale, const float* bias,
        const float* col_shift, int m_rows, int n_cols, int k_depth, int has_scale, int has_bias) {{
    extern __shared__ unsigned char raw_smem[];
    unsigned base = (smem_u32(raw_smem) + 1023) & ~1023u;    // 128-byte swizzled tiles want 1024-byte alignment
    unsigned out_smem = base + STAGES * STAGE_BYTES, bias_smem = out_smem + OUT_BYTES;
    unsigned full = bias_smem + 2 * BN * 8, empty = full + 8 * STAGES, turn = empty + 8 * STAGES;
    int t = threadIdx.x, warp = t / 32, lane = t % 32;
    unsigned rank = 0;
    if (CLUSTER > 1) asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
    // work units: CLUSTER row blocks of UNIT_ROWS (one per CTA of the cluster) by one 256-column block, n fastest
    int tiles_n = n_cols / BN, units = (m_rows + CLUSTER * UNIT_ROWS - 1) / (CLUSTER * UNIT_ROWS) * tiles_n;
    int k_steps = k_depth / BK;
    int first = blockIdx.x / CLUSTER, step = gridDim.x / CLUSTER;
    if (t == 0) {{
        for (int s = 0; s < STAGES; ++s) {{
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" :: "r"(full + 8 * s) : "memory");
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(empty + 8 * s), "r"((PINGPONG ? 1 : 2) * CLUSTER)
                         : "memory");                 // each stage's readers: its warpgroup(s), in every CTA
        }}
        for (int g = 0; g < 2; ++g)                          // pingpong: warpgroup g's units whose loads it has seen
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 4;\n" :: "r"(turn + 8 * g) : "memory");  // its 4 warps
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }}
    cluster_sync();                                          // every barrier of the cluster made before any use
    if (warp == 8) {{                                        // the producer: one thread issues every load
        if (lane == 0) {{
            int it = 0;
            for (int u = first; u < units; u += step) {{
                int m0 = (u / tiles_n * CLUSTER + rank) * UNIT_ROWS, n0 = u % tiles_n * BN;
                for (int kb = 0; kb < k_steps; ++kb, ++it) {{
                    int s = it % STAGES;
                    unsigned stage = base + s * STAGE_BYTES;
                    wait_phase(empty + 8 * s, ((it / STAGES) & 1) ^ 1);   // a fresh barrier passes parity 1
                    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n"
                                 :: "r"(full + 8 * s), "r"(STAGE_BYTES) : "memory");
                    tma_load(stage, map_a, kb * BK, m0, full + 8 * s);
                    if (CLUSTER > 1)                          // this CTA's share of the weight tile, to all
                        tma_load_all(stage + A_BYTES + rank * (BN / CLUSTER) * BK * 2, map_b, kb * BK,
                                     n0 + rank * (BN / CLUSTER), full + 8 * s);
                    else
                        tma_load(stage + A_BYTES, map_b, kb * BK, n0, full + 8 * s);
                }}
            }}
        }}
    }} else {{
        int wg = t / 128, w = (t % 128) / 32;
        unsigned staging = out_smem + wg * 64 * BN * 2, wg_bias = bias_smem + wg * BN * 8;
        // stmatrix: lanes 8q..8q+7 address the rows of 8x8 matrix q (rows +8 for odd q, columns +8 for q >= 2)
        int q = lane / 8, st_row = 16 * w + (q & 1) * 8 + lane % 8;
        // coop: both warpgroups take every unit of this CTA (rows 0-63 and 64-127 of it); pingpong: each takes
        // every other unit whole (64 rows), so one's epilogue runs while the other's MMAs do
        for (int j = PINGPONG ? wg : 0; first + j * step < units; j += PINGPONG ? 2 : 1) {{
            int u = first + j * step, n0 = u % tiles_n * BN;
            int rows0 = (u / tiles_n * CLUSTER + rank) * UNIT_ROWS + (PINGPONG ? 0 : wg * 64);
            // this thread's epilogue operands, fetched while the MMAs run: rows r and r + 8, two bias columns
            int row = rows0 + 16 * w + lane / 4;
            float sc0 = 1.f, sc1 = 1.f, b0 = 0.f, b1 = 0.f, h0 = 0.f, h1 = 0.f;
            if (has_scale) {{
                sc0 = row < m_rows ? row_scale[row] : 0.f;
                sc1 = row + 8 < m_rows ? row_scale[row + 8] : 0.f;
            }}
            if (has_bias) {{ b0 = bias[n0 + 2 * (t % 128)]; b1 = bias[n0 + 2 * (t % 128) + 1]; }}
            if (SHIFT) {{ h0 = col_shift[n0 + 2 * (t % 128)]; h1 = col_shift[n0 + 2 * (t % 128) + 1]; }}
            float acc[128];
            int s = 0;
            // pingpong: the other warpgroup's unit j - 1 first, all its stages seen: only then is every stage's
            // barrier at most one phase behind this unit's loads (a parity wait further ahead would pass early)
            if (PINGPONG && j > 0) wait_phase(turn + 8 * (1 - wg), ((j - 1) / 2) & 1);
            for (int kb = 0; kb < k_steps; ++kb) {{
                int it = j * k_steps + kb;                   // the producer's count of this stage load
                s = it % STAGES;
                unsigned stage = base + s * STAGE_BYTES;
                wait_phase(full + 8 * s, (it / STAGES) & 1);
                asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
                #pragma unroll
                for (int k = 0; k < 4; ++k) {{
                    unsigned long long da = desc_sw128(stage + (PINGPONG ? 0 : wg * 8192) + 32 * k);
                    unsigned long long db = desc_sw128(stage + A_BYTES + 32 * k);
                    asm volatile(
                        "{{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                        "wgmma.mma_async.sync.aligned.m64n256k16.f32." KIND "." KIND " {{{cuda_attention._operands(0, 128)}}}, "
                        "%128, %129, p, 1, 1, 0, 0;\n}}\n"
                        : {cuda_attention._acc_constraints("acc", 128)}
                        : "l"(da), "l"(db), "r"(kb * 4 + k));
                }}
                asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
                if (kb > 0) {{                               // the step before this one is done with its stage
                    asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                    if (t % 128 == 0) release_stage(empty + 8 * ((it - 1) % STAGES));
                }}
            }}
            if (PINGPONG) {{                                 // each warp once past its own waits (a lagging warp
                __syncwarp();                                // must not miss a phase of the other's turn)
                if (lane == 0) asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(turn + 8 * wg) : "memory");
            }}
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            #pragma unroll
            for (int i = 0; i < 128; ++i)                    // no epilogue arithmetic moves above the wait
                asm volatile("" : "+f"(acc[i]) :: "memory");
            if (t % 128 == 0) release_stage(empty + 8 * s);
            // epilogue: this warpgroup's 64 x 256 through its staging buffer (four 64 x 64 swizzled pieces),
            // which the last tile's stores must have read by now; the bias goes through shared memory
            if (t % 128 == 0)
                asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
            if (SHIFT)
                asm volatile("st.shared.v4.f32 [%0], {{%1, %2, %3, %4}};\n"
                             :: "r"(wg_bias + (t % 128) * 16), "f"(b0), "f"(b1), "f"(h0), "f"(h1) : "memory");
            else
                asm volatile("st.shared.v2.f32 [%0], {{%1, %2}};\n" :: "r"(wg_bias + (t % 128) * 8), "f"(b0), "f"(b1) : "memory");
            asm volatile("bar.sync %0, 128;\n" :: "r"(1 + wg) : "memory");
            // per thread 4 base addresses and immediate offsets (ptxas otherwise keeps 48 addresses live)
            unsigned bias_at = wg_bias + (SHIFT ? 16 : 8) * (lane % 4), st_at[4];
            #pragma unroll
            for (int a = 0; a < 4; ++a)
                st_at[a] = staging + st_row * 128 + (((2 * a + q / 2) ^ (st_row & 7)) << 4);
{_epilogue(shift)}
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // visible to the TMA unit
            asm volatile("bar.sync %0, 128;\n" :: "r"(1 + wg) : "memory");
            if (t % 128 == 0 && rows0 < m_rows) {{            // (a later CTA's row block may lie past M)
                #pragma unroll
                for (int piece = 0; piece < 4; ++piece)
                    tma_store(map_o, staging + piece * 8192, n0 + 64 * piece, rows0);
                asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
            }}
        }}
        if (t % 128 == 0)                                    // shared memory lives until the stores read it
            asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
    }}
    __syncwarp();
    cluster_sync();   // no CTA leaves while a peer may still write into it or arrive on its barriers
}}
"""


@functools.lru_cache(maxsize=None)
def _kernel(dtype: torch.dtype, gelu: bool, cluster: int, shift: bool, schedule: str, device_index: int):
    return cuda_attention.build(source(dtype, gelu, cluster, shift, schedule), "scaled_gemm", shared_bytes(schedule),
                                device_index)


@functools.lru_cache(maxsize=None)
def resident_clusters(cluster: int, schedule: str, device_index: int) -> int:
    """How many clusters of this kernel the GPU holds at once (a persistent grid larger than that would
    run a second, near-empty wave): cuOccupancyMaxActiveClusters, else every SM's share."""
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    if cluster == 1:
        return sms

    class LaunchConfig(ctypes.Structure):
        _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                    ("stream", ctypes.c_void_p), ("attrs", ctypes.c_void_p), ("num_attrs", ctypes.c_uint)]
    kernel = _kernel(torch.float16, False, cluster, False, schedule, device_index)
    config = LaunchConfig((ctypes.c_uint * 3)(sms // cluster * cluster, 1, 1), (ctypes.c_uint * 3)(THREADS, 1, 1),
                          shared_bytes(schedule), None, None, 0)
    count = ctypes.c_int(0)
    err = ctypes.CDLL("libcuda.so.1").cuOccupancyMaxActiveClusters(ctypes.byref(count), kernel.func,
                                                                   ctypes.byref(config))
    return count.value if not err and count.value > 0 else sms // cluster


def scaled_gemm(x, w, bias=None, row_scale=None, gelu=False, out=None, cluster=2, shift=None, schedule="coop"):
    """act(row_scale[:, None] * (x @ w^T + shift) + bias) by the kernel above; bias, shift (N,) and
    row_scale (M,) float32. (A LayerNorm fold's shift: W2 s, for a residual stream x + s.)"""
    (m, k), n = x.shape, w.shape[0]
    if not (m and k and n) or k % BK or n % BN or w.shape[1] != k or w.dtype != x.dtype \
            or not (x.is_contiguous() and w.is_contiguous()) or cluster not in CLUSTERS or schedule not in SCHEDULES:
        raise ValueError(f"scaled_gemm wants contiguous x (M, K), w (N, K) of one dtype, K % {BK} == 0, N % {BN} == 0,"
                         f" a cluster of {CLUSTERS} and a schedule of {SCHEDULES}")
    for vector, length in ((bias, n), (row_scale, m), (shift, n)):
        if vector is not None and (vector.dtype != torch.float32 or vector.shape != (length,) or not vector.is_contiguous()):
            raise ValueError("scaled_gemm wants bias (N,), shift (N,) and row_scale (M,) contiguous float32")
    out = torch.empty(m, n, device=x.device, dtype=x.dtype) if out is None else out
    if out.shape != (m, n) or out.dtype != x.dtype or not out.is_contiguous():
        raise ValueError("scaled_gemm wants out (M, N) contiguous, of x's dtype")
    maps = (cuda_attention._tensor_map(x.view(1, m, k), unit_rows(schedule)),
            cuda_attention._tensor_map(w.view(1, n, k), BN // cluster),
            cuda_attention._tensor_map(out.view(1, m, n), 64))
    dummy = out  # never read where its flag is off
    device_index = x.device.index or 0
    units = -(-m // (cluster * unit_rows(schedule))) * (n // BN)
    _kernel(x.dtype, gelu, cluster, shift is not None, schedule, device_index)(
        grid=(min(units, resident_clusters(cluster, schedule, device_index)) * cluster, 1, 1), block=(THREADS, 1, 1),
        args=[*maps, dummy if row_scale is None else row_scale, dummy if bias is None else bias,
              dummy if shift is None else shift, m, n, k,
              int(row_scale is not None), int(bias is not None)], shared_mem=shared_bytes(schedule))
    return out


def fold_layer_norm(gamma, beta, w, b):
    """LN(x) @ w^T + b == rstd(x)[:, None] * (x @ w2^T) + b2 (float64 here): w2 = w diag(gamma) less each
    row's mean (so x's own mean drops out inside the GEMM), b2 = w beta + b. Returns (w2 in w's dtype, b2
    float32); rstd(x) = 1 / sqrt(var(x) + eps) per row is what a statistics pass still computes.
    w2's rows are rounded to sum to zero as nearly as the dtype allows (zero_sum_rounding): each row's
    rounded sum multiplies the token's mean, so plain rounding costs bits where a stream's mean is large."""
    w64 = w.double() * gamma.double()[None, :]
    return zero_sum_rounding(w64 - w64.mean(dim=1, keepdim=True), w.dtype), (w.double() @ beta.double() + b.double()).float()


def _step(v: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """The neighbour of each 16-bit float v in `direction` (+1 up, -1 down), by its bits: sign and
    magnitude, so a step away from zero adds one to the magnitude and a step towards it takes one off."""
    bits = v.view(torch.int16).to(torch.int32)
    negative, magnitude = bits < 0, bits & 0x7FFF
    away = torch.where(negative, direction < 0, direction > 0)
    magnitude = torch.where(magnitude == 0, torch.ones_like(magnitude), magnitude + torch.where(away, 1, -1))
    negative = torch.where((bits & 0x7FFF) == 0, direction < 0, negative)  # from zero: the smallest of that sign
    return (magnitude | torch.where(negative, 0x8000, 0)).to(torch.int16).view(v.dtype)


def zero_sum_rounding(exact: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`exact` (float64, rows summing to zero) in `dtype`: round to nearest, then re-round the other way
    the entries nearest their rounding midpoint, as many per row as bring the row's sum closest to zero.
    Each flipped entry moves from just under half a unit in the last place from its exact value to just
    over; the row's sum goes from ~sqrt(K)/2 units to about one."""
    near = exact.to(dtype)
    if dtype not in (torch.float16, torch.bfloat16):
        return near
    error = near.double() - exact
    other = _step(near, -torch.sign(error))                      # the exact value's other neighbour
    delta = torch.where(error == 0, torch.zeros_like(error), other.double() - near.double())  # a flip's effect
    cost = (other.double() - exact).abs() - error.abs()          # what it adds to that entry's error
    total = near.double().sum(dim=1, keepdim=True)
    useful = (torch.sign(delta) == -torch.sign(total)) & (delta != 0)
    cost = torch.where(useful, cost, torch.full_like(cost, float("inf")))
    order = cost.argsort(dim=1)
    gains = torch.where(useful, delta, torch.zeros_like(delta)).gather(1, order)
    sums = torch.cat([total, total + gains.cumsum(dim=1)], dim=1)  # the row's sum after the first j flips
    flips = sums.abs().argmin(dim=1, keepdim=True)
    chosen = torch.zeros_like(useful).scatter_(1, order, torch.arange(exact.shape[1]).expand_as(order) < flips)
    return torch.where(chosen, other, near)


def reference(x, w, bias=None, row_scale=None, gelu=False, shift=None):
    y = x.float() @ w.float().t()
    if shift is not None:
        y = y + shift
    if row_scale is not None:
        y = y * row_scale[:, None]
    if bias is not None:
        y = y + bias
    return F.gelu(y, approximate="tanh") if gelu else y


def check():
    """Relative errors against float32 at odd row counts, both dtypes, with and without each part."""
    ok = True
    g = torch.Generator(device="cuda").manual_seed(0)
    for (schedule, cluster), dtype in itertools.product(VARIANTS, (torch.float16, torch.bfloat16)):
        for m, n, k, scaled, biased, gelu, shifted in (
                (392, 2304, 768, True, True, False, True), (197, 256, 64, False, False, False, False),
                (1000, 3072, 768, True, True, True, True), (129, 768, 3072, False, True, False, False),
                (100, 512, 192, True, True, False, False),   # a row block past M
                (4100, 3072, 768, True, True, True, True)):  # 396 tiles: CTAs take several
            x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
            w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
            bias = torch.randn(n, device="cuda", generator=g) if biased else None
            scale = torch.rand(m, device="cuda", generator=g) * 4 + 0.05 if scaled else None
            shift = torch.randn(n, device="cuda", generator=g) * 3 if shifted else None
            y = scaled_gemm(x, w, bias, scale, gelu, torch.full((m, n), float("nan"), device="cuda", dtype=dtype), cluster,
                            shift, schedule)
            torch.cuda.synchronize()  # (NaN-filled: a piece never written fails)
            ref = reference(x, w, bias, scale, gelu, shift)
            plain = ref.to(dtype).float()  # rounding the output alone
            err = ((y.float() - ref).norm() / ref.norm()).item()
            floor = ((plain - ref).norm() / ref.norm()).item()
            good = bool(torch.isfinite(y).all()) and err < 4 * floor + 1e-4
            ok = ok and good
            print(f"{str(dtype)[6:]:8s} {schedule:8s} cluster {cluster} M {m:5d} N {n:5d} K {k:5d} scale {int(scaled)} bias {int(biased)} "
                  f"gelu {int(gelu)} shift {int(shifted)}: relative error {err:.2e} (output rounding alone {floor:.2e}) "
                  f"{'ok' if good else 'WRONG'}", flush=True)
    return ok


def compare(spec):
    """qkv (bias) and fc1 (bias + GELU) at MODEL:BATCH: this kernel (with a row scale), each of VARIANTS,
    beside cuBLASLt's algorithms and the engine's extra configurations for the same GEMM without one;
    short timings, then the fastest cuBLAS and our three fastest sustained, in two rounds."""
    from engine.compile import capture_graph, graphed_ms
    from modeling import cublaslt as lt
    from modeling.config import vit_config
    from power_probe import Nvml, sustain
    name, batch = spec.split(":")
    cfg = vit_config(name, "ait")
    m, k, dev = int(batch) * cfg.seq_len, cfg.embed_dim, torch.device("cuda")
    nvml = Nvml(torch.cuda.current_device())
    energy = {}  # label -> site -> joules per GEMM, each round
    for site, n, gelu in (("qkv", 3 * cfg.embed_dim, False), ("fc1", cfg.mlp_hidden, True)):
        x = torch.randn(m, k, device="cuda", dtype=torch.float16)
        w = (torch.randn(n, k, device="cuda") / k ** 0.5).half()
        bias, scale = torch.randn(n, device="cuda"), torch.rand(m, device="cuda") + 0.5
        bias16, out = bias.half(), torch.empty(m, n, device="cuda", dtype=torch.float16)
        problem = lt.Problem(m, n, k, torch.float16, "gelu_bias" if gelu else "bias")
        runs = {f"cublas lt{i}": (lambda a=a, b=b: lt.run(problem, a, b, x, w, bias16, out))
                for i, (a, b) in enumerate(lt.algorithms(problem))}
        for config in lt.extra_configs(problem):   # the engine's plan times these too (fc1's fastest is one)
            a, b = lt.configured(problem, *config)
            runs["cublas lt" + ".".join(map(str, config))] = lambda a=a, b=b: lt.run(problem, a, b, x, w, bias16, out)
        ref = reference(x, w, bias, scale, gelu)
        for schedule, cluster in VARIANTS:
            label = f"ours {schedule} c{cluster}"
            runs[label] = lambda c=cluster, sc=schedule: scaled_gemm(x, w, bias, scale, gelu, out, c, schedule=sc)
            out.fill_(float("nan"))
            runs[label]()  # (the tensor maps are made outside capture)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            print(f"{spec} {site} {label}: relative error {err:.2e} against float32, "
                  f"{resident_clusters(cluster, schedule, dev.index or 0)} clusters resident", flush=True)
        del ref
        flops = 2 * m * n * k
        short = {label: graphed_ms(fn, dev, budget_s=0.15) for label, fn in runs.items()}
        for label, ms in short.items():
            print(f"{spec} {site} {label:20s} {ms * 1e3:8.1f} us short, {flops / ms / 1e9:6.0f} TFLOP/s", flush=True)
        best = min((ms, label) for label, ms in short.items() if not label.startswith("ours"))[1]
        ours = sorted((ms, label) for label, ms in short.items() if label.startswith("ours"))
        ours = [label for _, label in ours[:3]]  # the three fastest of ours, sustained
        for round_ in range(2):
            for label in (best, *ours):
                graph, _ = capture_graph(lambda: [runs[label]() for _ in range(10)])
                row = sustain(nvml, graph.replay, 10, f"{site} {label} round {round_ + 1}")
                energy.setdefault(label if label in ours else "cublas", {}).setdefault(site, []).append(row["j"])
    # the variant with the least energy over both sites (each site's median), for tools/fold_whatif.py
    total = {label: sum(statistics.median(js) for js in sites.values()) for label, sites in energy.items()
             if len(sites) == 2}  # (sustained at both sites)
    for label, joules in sorted(total.items(), key=lambda kv: kv[1]):
        print(f"{spec} qkv + fc1 {label:22s} {joules * 1e3:8.2f} mJ ({joules / total['cublas']:.3f} of cuBLAS)", flush=True)
    mine = [(j, label) for label, j in total.items() if label != "cublas"]
    if mine:
        schedule, cluster = min(mine)[1].split()[1:]
        print(f"best variant {schedule}:{cluster[1:]}", flush=True)


def main(argv):
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    if check():
        compare(argv[0] if argv else "vit_base_patch16_224:256")
    else:
        sys.exit("scaled_gemm: wrong numbers, not timed")


if __name__ == "__main__":
    main(sys.argv[1:])
