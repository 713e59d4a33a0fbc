"""Can the engine build Hopper kernels in CUDA C++ at run time, with no nvcc and no new package?
torch.cuda._compile_kernel compiles through NVRTC (shipped with torch's CUDA wheels) and loads
the result with the driver. This probe builds for sm_90a and checks against torch the pieces an
FA3-style attention kernel is made of:

1. `wgmma.mma_async` m64n64k16, A and B from shared memory (no swizzle: 8x8 core matrices of
   128 bytes, K-major), also replayed from a CUDA graph;
2. A from registers (the fragment that matches the accumulator's layout, how P feeds P V) and B
   MN-major (V as stored): the descriptor's LBO is the stride between core matrices along K, SBO
   along N (the other reading is wrong);
3. TMA (`cp.async.bulk.tensor.2d`, a CUtensorMap from cuTensorMapEncodeTiled kept in device
   memory and read through a generic address) with 128-byte swizzle, completion on an mbarrier,
   zeros past the matrix's end; then four k16 steps whose descriptors (layout 1 = 128-byte swizzle,
   SBO 1024 bytes, LBO unused) advance 32 bytes along K. The scale-d operand must be a predicate:
   given as the immediate 1 it compiled and gave wrong sums.

Session 16 on the H100 (torch 2.11, CUDA 13.0): all three exact to 1e-5, NVRTC compile and load
0.7-1.0 s (`docs/results/2026-11-24-h100-session16/nvrtc-wgmma-probe.log`).

    python3 tools/nvrtc_wgmma_probe.py
"""
import time

import torch

SOURCE = r"""
__device__ unsigned shared_address(const void* p) {
    unsigned long long s;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(s) : "l"(p));
    return (unsigned)s;
}

extern "C" __global__ void __launch_bounds__(128) wgmma_64x64x16(const unsigned short* a, const unsigned short* b,
                                                                 float* d) {
    // a: 64 x 16 row-major (M x K), b: 64 x 16 row-major (N x K); d = a b^T, 64 x 64 float32
    __shared__ __align__(128) unsigned short sa[64 * 16];
    __shared__ __align__(128) unsigned short sb[64 * 16];
    int t = threadIdx.x;
    for (int i = t; i < 64 * 16; i += 128) {
        int r = i / 16, k = i % 16;
        // core matrix (r / 8, k / 8), 64 elements each, laid out K-adjacent first
        int off = ((r / 8) * 2 + k / 8) * 64 + (r % 8) * 8 + k % 8;
        sa[off] = a[i];
        sb[off] = b[i];
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    unsigned long long lbo = 128, sbo = 256;  // bytes between core matrices along K, along M/N
    unsigned long long da = ((unsigned long long)(shared_address(sa) & 0x3FFFF) >> 4)
                          | ((lbo >> 4) << 16) | ((sbo >> 4) << 32);
    unsigned long long db = ((unsigned long long)(shared_address(sb) & 0x3FFFF) >> 4)
                          | ((lbo >> 4) << 16) | ((sbo >> 4) << 32);
    float c[32];
    for (int i = 0; i < 32; ++i) c[i] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "%32, %33, p, 1, 1, 0, 0;\n}\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3]), "+f"(c[4]), "+f"(c[5]), "+f"(c[6]), "+f"(c[7]),
          "+f"(c[8]), "+f"(c[9]), "+f"(c[10]), "+f"(c[11]), "+f"(c[12]), "+f"(c[13]), "+f"(c[14]), "+f"(c[15]),
          "+f"(c[16]), "+f"(c[17]), "+f"(c[18]), "+f"(c[19]), "+f"(c[20]), "+f"(c[21]), "+f"(c[22]), "+f"(c[23]),
          "+f"(c[24]), "+f"(c[25]), "+f"(c[26]), "+f"(c[27]), "+f"(c[28]), "+f"(c[29]), "+f"(c[30]), "+f"(c[31])
        : "l"(da), "l"(db));
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    // accumulator layout: warp w holds rows 16w..16w+15; lane l rows l/4 and l/4 + 8, columns 8j + 2(l%4) + {0,1}
    int w = t / 32, l = t % 32;
    for (int j = 0; j < 8; ++j)
        for (int h = 0; h < 2; ++h)
            for (int e = 0; e < 2; ++e)
                d[(16 * w + l / 4 + 8 * h) * 64 + 8 * j + 2 * (l % 4) + e] = c[4 * j + 2 * h + e];
}

extern "C" __global__ void __launch_bounds__(128) wgmma_regs_a_mn_b(const unsigned short* a, const unsigned short* b,
                                                                    float* d, int lbo, int sbo) {
    // a: 64 x 16 row-major (M x K) taken into registers; b: 16 x 64 row-major (K x N, N contiguous:
    // "MN-major", as V is for P V); d = a b, 64 x 64 float32. lbo/sbo: the descriptor's two byte
    // offsets, given so the probe can try both readings of the MN-major layout.
    __shared__ __align__(128) unsigned short sb[8 * 16 * 64];  // 8x the tile: a wrong reading stays inside
    int t = threadIdx.x;
    for (int i = t; i < 8 * 16 * 64; i += 128)
        sb[i] = 0;
    __syncthreads();
    for (int i = t; i < 16 * 64; i += 128) {
        int k = i / 64, n = i % 64;
        // core matrix (k / 8, n / 8): 8 K-rows of 8 contiguous N-elements; N-adjacent first
        int off = ((k / 8) * 8 + n / 8) * 64 + (k % 8) * 8 + n % 8;
        sb[off] = b[i];
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    unsigned long long db = ((unsigned long long)(shared_address(sb) & 0x3FFFF) >> 4)
                          | ((unsigned long long)(lbo >> 4) << 16) | ((unsigned long long)(sbo >> 4) << 32);
    int w = t / 32, l = t % 32, r = 16 * w + l / 4, c = 2 * (l % 4);
    unsigned ra[4];  // {a(r, c..c+1)}, {a(r+8, c..)}, {a(r, c+8..)}, {a(r+8, c+8..)}
    ra[0] = a[r * 16 + c] | ((unsigned)a[r * 16 + c + 1] << 16);
    ra[1] = a[(r + 8) * 16 + c] | ((unsigned)a[(r + 8) * 16 + c + 1] << 16);
    ra[2] = a[r * 16 + c + 8] | ((unsigned)a[r * 16 + c + 9] << 16);
    ra[3] = a[(r + 8) * 16 + c + 8] | ((unsigned)a[(r + 8) * 16 + c + 9] << 16);
    float acc[32];
    for (int i = 0; i < 32; ++i) acc[i] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, 0, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"
        : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]),
          "+f"(acc[7]), "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]), "+f"(acc[12]), "+f"(acc[13]),
          "+f"(acc[14]), "+f"(acc[15]), "+f"(acc[16]), "+f"(acc[17]), "+f"(acc[18]), "+f"(acc[19]),
          "+f"(acc[20]), "+f"(acc[21]), "+f"(acc[22]), "+f"(acc[23]), "+f"(acc[24]), "+f"(acc[25]),
          "+f"(acc[26]), "+f"(acc[27]), "+f"(acc[28]), "+f"(acc[29]), "+f"(acc[30]), "+f"(acc[31])
        : "r"(ra[0]), "r"(ra[1]), "r"(ra[2]), "r"(ra[3]), "l"(db));
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    for (int j = 0; j < 8; ++j)
        for (int h = 0; h < 2; ++h)
            for (int e = 0; e < 2; ++e)
                d[(r + 8 * h) * 64 + 8 * j + c + e] = acc[4 * j + 2 * h + e];
}

__device__ void wait_phase(unsigned bar, unsigned phase) {
    unsigned done = 0;
    while (!done)
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(bar), "r"(phase) : "memory");
}

extern "C" __global__ void __launch_bounds__(128) tma_wgmma_swizzle128(const void* map_a, const void* map_b,
                                                                       float* d, int row_a, int row_b,
                                                                       unsigned short* raw, int layout, int sbo_bytes,
                                                                       int lbo_bytes) {
    // A tile: 64 rows from row_a of a (rows x 64) float16 matrix, B tile: 64 rows from row_b of
    // another, both by TMA with 128-byte swizzle (one 128-byte row of K = 64 per matrix row); then
    // d = A B^T by four m64n64k16 steps whose descriptors advance 32 bytes along K. Rows past the
    // matrix's end arrive as zeros.
    __shared__ __align__(1024) unsigned short sa[64 * 64];
    __shared__ __align__(1024) unsigned short sb[64 * 64];
    __shared__ __align__(8) unsigned long long bar;
    unsigned bar_addr = shared_address(&bar);
    int t = threadIdx.x;
    if (t == 0) {
        asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" :: "r"(bar_addr) : "memory");
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    if (t == 0) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(bar_addr), "r"(2 * 64 * 64 * 2)
                     : "memory");
        asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                     :: "r"(shared_address(sa)), "l"(map_a), "r"(0), "r"(row_a), "r"(bar_addr) : "memory");
        asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                     :: "r"(shared_address(sb)), "l"(map_b), "r"(0), "r"(row_b), "r"(bar_addr) : "memory");
    }
    wait_phase(bar_addr, 0);
    for (int i = t; i < 64 * 64; i += 128)  // the A tile as it landed, for the host to check the swizzle
        raw[i] = sa[i];
    const unsigned long long swizzle128 = (unsigned long long)layout << 62,
        sbo = (unsigned long long)(sbo_bytes >> 4) << 32, lbo = (unsigned long long)(lbo_bytes >> 4) << 16;
    float acc[32];
    for (int i = 0; i < 32; ++i) acc[i] = 0.f;
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
    for (int k = 0; k < 4; ++k) {
        unsigned long long da = (((shared_address(sa) + 32 * k) & 0x3FFFF) >> 4) | lbo | sbo | swizzle128;
        unsigned long long db = (((shared_address(sb) + 32 * k) & 0x3FFFF) >> 4) | lbo | sbo | swizzle128;
        asm volatile(
            "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
            "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
            "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
            "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
            "%32, %33, p, 1, 1, 0, 0;\n}\n"
            : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3]), "+f"(acc[4]), "+f"(acc[5]), "+f"(acc[6]),
              "+f"(acc[7]), "+f"(acc[8]), "+f"(acc[9]), "+f"(acc[10]), "+f"(acc[11]), "+f"(acc[12]), "+f"(acc[13]),
              "+f"(acc[14]), "+f"(acc[15]), "+f"(acc[16]), "+f"(acc[17]), "+f"(acc[18]), "+f"(acc[19]),
              "+f"(acc[20]), "+f"(acc[21]), "+f"(acc[22]), "+f"(acc[23]), "+f"(acc[24]), "+f"(acc[25]),
              "+f"(acc[26]), "+f"(acc[27]), "+f"(acc[28]), "+f"(acc[29]), "+f"(acc[30]), "+f"(acc[31])
            : "l"(da), "l"(db), "r"(k));
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    int w = t / 32, l = t % 32, r = 16 * w + l / 4, c = 2 * (l % 4);
    for (int j = 0; j < 8; ++j)
        for (int h = 0; h < 2; ++h)
            for (int e = 0; e < 2; ++e)
                d[(r + 8 * h) * 64 + 8 * j + c + e] = acc[4 * j + 2 * h + e];
}
"""


def tensor_map(t: torch.Tensor, box_rows: int) -> torch.Tensor:
    """A TMA descriptor (CUtensorMap, 128 bytes) for a 2-D float16 tensor with contiguous rows of
    64 elements: boxes of box_rows x 64, 128-byte swizzle, zeros past the end; returned in device
    memory, where the kernels read it through a generic address."""
    import ctypes
    cuda = ctypes.CDLL("libcuda.so.1")
    raw = (ctypes.c_uint8 * 256)()
    base = (ctypes.addressof(raw) + 63) // 64 * 64
    rows, cols = t.shape
    dims = (ctypes.c_uint64 * 2)(cols, rows)
    strides = (ctypes.c_uint64 * 1)(t.stride(0) * t.element_size())
    box = (ctypes.c_uint32 * 2)(cols, box_rows)
    steps = (ctypes.c_uint32 * 2)(1, 1)
    f16, no_interleave, swizzle_128b, l2_256b, zero_fill = 6, 0, 3, 3, 0
    err = cuda.cuTensorMapEncodeTiled(ctypes.c_void_p(base), f16, 2, ctypes.c_void_p(t.data_ptr()), dims, strides,
                                      box, steps, no_interleave, swizzle_128b, l2_256b, zero_fill)
    if err:
        raise RuntimeError(f"cuTensorMapEncodeTiled: CUresult {err}")
    return torch.frombuffer(bytearray(ctypes.string_at(base, 128)), dtype=torch.uint8).cuda()


def main():
    torch.manual_seed(0)
    start = time.perf_counter()
    kernel = torch.cuda._compile_kernel(SOURCE, "wgmma_64x64x16", compute_capability="90a")
    print(f"NVRTC compile + load: {time.perf_counter() - start:.2f} s (torch {torch.__version__}, "
          f"CUDA {torch.version.cuda})")
    a = torch.randn(64, 16, device="cuda", dtype=torch.float16)
    b = torch.randn(64, 16, device="cuda", dtype=torch.float16)
    d = torch.full((64, 64), float("nan"), device="cuda")
    kernel(grid=(1, 1, 1), block=(128, 1, 1), args=[a.view(torch.int16), b.view(torch.int16), d])
    want = a.float() @ b.float().t()
    print(f"eager: max |d - a b^T| = {(d - want).abs().max().item():.2e} (values up to {want.abs().max().item():.1f})")
    d.fill_(float("nan"))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel(grid=(1, 1, 1), block=(128, 1, 1), args=[a.view(torch.int16), b.view(torch.int16), d])
    d.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    print(f"graph replay: max |d - a b^T| = {(d - want).abs().max().item():.2e}")

    # A from registers, B MN-major: which descriptor offsets does the hardware read?
    kernel2 = torch.cuda._compile_kernel(SOURCE, "wgmma_regs_a_mn_b", compute_capability="90a")
    bt = torch.randn(16, 64, device="cuda", dtype=torch.float16)
    want2 = a.float() @ bt.float()
    for lbo, sbo in ((1024, 128), (128, 1024)):  # N-adjacent core matrices 128 B apart, K-adjacent 1024 B
        d.fill_(float("nan"))
        kernel2(grid=(1, 1, 1), block=(128, 1, 1), args=[a.view(torch.int16), bt.view(torch.int16), d, lbo, sbo])
        torch.cuda.synchronize()
        print(f"registers x MN-major, lbo {lbo} sbo {sbo}: max |d - a b| = {(d - want2).abs().max().item():.2e}")

    # TMA with 128-byte swizzle into the descriptors wgmma reads; the second tile runs past the end
    kernel3 = torch.cuda._compile_kernel(SOURCE, "tma_wgmma_swizzle128", compute_capability="90a")
    ma = torch.randn(200, 64, device="cuda", dtype=torch.float16)
    mb = torch.randn(150, 64, device="cuda", dtype=torch.float16)
    map_a, map_b = tensor_map(ma, 64), tensor_map(mb, 64)
    for layout, sbo, lbo in ((1, 1024, 16), (1, 1024, 1024), (1, 1024, 0), (2, 1024, 16), (3, 1024, 16), (1, 512, 16)):
        d.fill_(float("nan"))
        raw = torch.zeros(64, 64, device="cuda", dtype=torch.int16)
        kernel3(grid=(1, 1, 1), block=(128, 1, 1), args=[map_a, map_b, d, 0, 0, raw, layout, sbo, lbo])
        torch.cuda.synchronize()
        full = ma[:64].float() @ mb[:64].float().t()
        first = ma[:64, :16].float() @ mb[:64, :16].float().t()
        print(f"layout {layout} sbo {sbo} lbo {lbo}: max |d - A B^T| = {(d - full).abs().max().item():.2e}, "
              f"vs first k16 only {(d - first).abs().max().item():.2e}, vs transposed {(d - full.t()).abs().max().item():.2e}")
    for row_a, row_b in ((0, 0), (64, 32), (160, 120)):
        d.fill_(float("nan"))
        raw = torch.zeros(64, 64, device="cuda", dtype=torch.int16)
        kernel3(grid=(1, 1, 1), block=(128, 1, 1), args=[map_a, map_b, d, row_a, row_b, raw, 1, 1024, 16])
        torch.cuda.synchronize()
        # 128-byte swizzle: the 16-byte chunk c of row r lands at chunk c ^ (r % 8) of that row
        rows = torch.arange(64).view(64, 1, 1)
        chunks = torch.arange(8).view(1, 8, 1)
        src = (rows * 64 + (chunks ^ (rows % 8)) * 8 + torch.arange(8).view(1, 1, 8)).reshape(-1).cuda()
        landed = raw.view(torch.float16).reshape(-1)[src].view(64, 64)
        want_a = torch.zeros(64, 64, device="cuda", dtype=torch.float16)
        want_a[:min(64, 200 - row_a)] = ma[row_a:row_a + 64]
        print(f"  TMA tile as landed, unswizzled, equals A rows {row_a}..: {torch.equal(landed, want_a)}; "
              f"as a plain copy: {torch.equal(raw.view(torch.float16), want_a)}")
        pa = torch.zeros(64, 64, device="cuda")
        pb = torch.zeros(64, 64, device="cuda")
        pa[:min(64, 200 - row_a)] = ma[row_a:row_a + 64].float()
        pb[:min(64, 150 - row_b)] = mb[row_b:row_b + 64].float()
        print(f"TMA + 128-byte swizzle, A rows {row_a}.., B rows {row_b}..: "
              f"max |d - A B^T| = {(d - pa @ pb.t()).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
