"""Prototype (not used by the engine): a ping-pong warp-specialized GEMM for Hopper in Gluon,
Triton's lower-level language, timed beside cuBLAS and the engine's Triton GEMM.

Why: at K = 768-1024 our persistent TMA GEMM stalls the tensor cores for every tile's epilogue
(perf-notes attempts 19-22). Here two consumer warpgroups take alternate output tiles: while
one runs its epilogue (bias, GELU, residual, store) the other's MMAs run, and one loader warp
keeps a ring of TMA loads ahead of both (CUTLASS's "ping-pong" schedule, written here from
the idea, not the code). Gluon kernels cannot run on the CPU interpreter, so
this stays a GPU-side probe until it wins.

Written against Triton 3.6's Gluon (the H100 machine's); Gluon is experimental and moves: Triton
3.9 (what pip installs here) renamed tma.async_copy_global_to_shared to async_load, so this file
does not compile there.

    python3 tools/pingpong_gemm.py [MODEL:BATCH ...]      (GPU)
    python3 tools/pingpong_gemm.py --compile-only         (CPU: compiles for sm_90, no GPU needed)
"""
import sys

import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                              warpgroup_mma_wait)

BLOCK_M, BLOCK_N, BLOCK_K = 128, 128, 64
COMPILE_VARIANTS = ((True, 0, False), (True, 3, False), (False, 0, True))


@gluon.jit
def _tile_origin(tile, n_m, n_n, GROUP_M: gl.constexpr, BM: gl.constexpr, BN: gl.constexpr):
    # GROUP_M rows of tiles walk the columns together, so the W tiles they share stay in L2
    per_group = GROUP_M * n_n
    first_m = (tile // per_group) * GROUP_M
    rows_here = min(n_m - first_m, GROUP_M)
    return (first_m + (tile % per_group) % rows_here) * BM, ((tile % per_group) // rows_here) * BN


@gluon.jit
def _loader(a_desc, w_desc, c_desc, C, BIAS, a_ring, w_ring, c_stage, ready, empty, turn, M, N, K,
            HAS_BIAS: gl.constexpr, ACT: gl.constexpr, ACCUMULATE: gl.constexpr, GROUP_M: gl.constexpr,
            DEBUG: gl.constexpr):
    # the A and W tiles of every K step of every tile of this program, in order,
    # into a ring of STAGES slots; a slot is reused once its consumer marks it empty
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_ring.type.shape[0]
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(N, BN)
    k_steps = gl.cdiv(K, BK)
    step = 0
    for tile in range(gl.program_id(0), n_m * n_n, gl.num_programs(0)):
        off_m, off_n = _tile_origin(tile, n_m, n_n, GROUP_M, BM, BN)
        for ks in range(k_steps):
            slot = step % STAGES
            mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)  # fresh barriers pass phase 1
            mbarrier.expect(ready.index(slot), a_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [off_m, ks * BK], ready.index(slot), a_ring.index(slot))
            tma.async_copy_global_to_shared(w_desc, [off_n, ks * BK], ready.index(slot), w_ring.index(slot))
            step += 1


@gluon.jit
def _consume(which: gl.constexpr, a_desc, w_desc, c_desc, C, BIAS, a_ring, w_ring, c_stage, ready, empty, turn, M, N, K,
             HAS_BIAS: gl.constexpr, ACT: gl.constexpr, ACCUMULATE: gl.constexpr, GROUP_M: gl.constexpr,
             DEBUG: gl.constexpr):
    # one warpgroup: this program's tiles number which, which + 2, ...; the other warpgroup
    # takes the rest, so one's epilogue runs while the other's MMAs do
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = w_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    STAGES: gl.constexpr = a_ring.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BN, 16])
    n_m = gl.cdiv(M, BM)
    n_n = gl.cdiv(N, BN)
    k_steps = gl.cdiv(K, BK)
    programs = gl.num_programs(0)
    first = gl.program_id(0)
    staged = c_stage.index(which)
    share: gl.constexpr = 1 if DEBUG == 2 else 2  # DEBUG 2: the first warpgroup takes every tile
    start = first + which * programs
    if DEBUG == 2 and which == 1:
        start = n_m * n_n
    done = 0
    for tile in range(start, n_m * n_n, share * programs):
        off_m, off_n = _tile_origin(tile, n_m, n_n, GROUP_M, BM, BN)
        step0 = ((tile - first) // programs) * k_steps  # this tile's first slot in the loader's order
        acc = gl.zeros([BM, BN], gl.float32, layout)
        # the two mainloops take turns, so the ring's slots are consumed in the loader's order: a
        # consumer that ran two phases ahead on a slot would take a stale phase for its own
        # (parity waits alias; measured: wrong results without the turns)
        if DEBUG != 2:
            mbarrier.wait(turn.index(which), (done & 1) ^ (1 - which))
        for ks in range(k_steps):
            step = step0 + ks
            slot = step % STAGES
            mbarrier.wait(ready.index(slot), (step // STAGES) & 1)
            acc = warpgroup_mma(a_ring.index(slot), w_ring.index(slot).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
            # the previous step's MMA has finished reading its slot
            mbarrier.arrive(empty.index((step + STAGES - 1) % STAGES), count=1, pred=ks > 0)
        if DEBUG != 2:
            mbarrier.arrive(turn.index(1 - which), count=1)  # its MMAs are issued: the other's turn
        done += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        mbarrier.arrive(empty.index((step0 + k_steps - 1) % STAGES), count=1)

        cols = off_n + gl.arange(0, BN, layout=gl.SliceLayout(0, layout))
        if HAS_BIAS:
            acc = acc + gl.expand_dims(gl.load(BIAS + cols, mask=cols < N, other=0.0).to(gl.float32), 0)
        if ACT == 1:  # exact GELU
            acc = 0.5 * acc * (1.0 + gl.erf(acc * 0.7071067811865476))
        if ACT == 3:  # tanh GELU with the GPU's one-instruction tanh
            u = 0.7978845608028654 * (acc + 0.044715 * acc * acc * acc)
            t = gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [u], dtype=gl.float32, is_pure=True,
                                          pack=1)
            acc = 0.5 * acc * (1.0 + t)
        if ACCUMULATE:  # the residual stream, updated in place
            rows = off_m + gl.arange(0, BM, layout=gl.SliceLayout(1, layout))
            ptrs = C + gl.expand_dims(rows.to(gl.int64) * N, 1) + gl.expand_dims(cols, 0)
            ok = gl.expand_dims(rows < M, 1) & gl.expand_dims(cols < N, 0)
            acc = acc + gl.load(ptrs, mask=ok, other=0.0).to(gl.float32)
        if DEBUG != 1:  # DEBUG 1: no store
            tma.store_wait(0)  # this warpgroup's previous store has left the staging buffer
            staged.store(acc.to(c_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [off_m, off_n], staged)
    tma.store_wait(0)


# Every worker partition receives the same arguments, so the two consumers differ only by which
# of these wrappers runs: the repetition is the API's, not an oversight.
@gluon.jit
def _consume_first(a_desc, w_desc, c_desc, C, BIAS, a_ring, w_ring, c_stage, ready, empty, turn, M, N, K,
                   HAS_BIAS: gl.constexpr, ACT: gl.constexpr, ACCUMULATE: gl.constexpr, GROUP_M: gl.constexpr,
                   DEBUG: gl.constexpr):
    _consume(0, a_desc, w_desc, c_desc, C, BIAS, a_ring, w_ring, c_stage, ready, empty, turn, M, N, K,
             HAS_BIAS, ACT, ACCUMULATE, GROUP_M, DEBUG)


@gluon.jit
def _consume_second(a_desc, w_desc, c_desc, C, BIAS, a_ring, w_ring, c_stage, ready, empty, turn, M, N, K,
                    HAS_BIAS: gl.constexpr, ACT: gl.constexpr, ACCUMULATE: gl.constexpr, GROUP_M: gl.constexpr,
                    DEBUG: gl.constexpr):
    _consume(1, a_desc, w_desc, c_desc, C, BIAS, a_ring, w_ring, c_stage, ready, empty, turn, M, N, K,
             HAS_BIAS, ACT, ACCUMULATE, GROUP_M, DEBUG)


@gluon.jit
def _pingpong_kernel(a_desc, w_desc, c_desc, C, BIAS, M, N, K, HAS_BIAS: gl.constexpr, ACT: gl.constexpr,
                     ACCUMULATE: gl.constexpr, GROUP_M: gl.constexpr, STAGES: gl.constexpr, DEBUG: gl.constexpr):
    a_ring = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    w_ring = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    c_stage = gl.allocate_shared_memory(c_desc.dtype, [2] + c_desc.block_type.shape, c_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(turn.index(0), count=1)
    mbarrier.init(turn.index(1), count=1)
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    args = (a_desc, w_desc, c_desc, C, BIAS, a_ring, w_ring, c_stage, ready, empty, turn, M, N, K,
            HAS_BIAS, ACT, ACCUMULATE, GROUP_M, DEBUG)
    # the loader is the default partition (its 4 warps issue the loads from one thread): Triton
    # 3.6 fails to lower a register-to-shared store in the default partition, which the
    # consumers' epilogue needs; the consumers get 232 registers a thread, the loader what is
    # left of maxnreg=168 x 384 threads (40). With maxnreg=128 nothing is left for the loader:
    # the consumers' setmaxnreg.inc waits forever (a hang measured on the H100)
    gl.warp_specialize([(_loader, args), (_consume_first, args), (_consume_second, args)], [4, 4], [232, 232])


def _layouts(dtype):
    from triton.experimental.gluon.language import NVMMASharedLayout
    gdt = {"float16": gl.float16, "bfloat16": gl.bfloat16}[str(dtype).replace("torch.", "")]
    return (NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_K], gdt),
            NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_K], gdt),
            NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], gdt))


def pingpong_linear(x, weight, bias=None, act="", out=None, accumulate=False, stages=4, group_m=8, debug=0):
    """act(x @ weight.T + bias), or out += x @ weight.T (accumulate); float16/bfloat16, rows contiguous."""
    import torch
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty(M, N, device=x.device, dtype=x.dtype)
    a_layout, w_layout, c_layout = _layouts(x.dtype)
    a_desc = TensorDescriptor.from_tensor(x, [BLOCK_M, BLOCK_K], a_layout)
    w_desc = TensorDescriptor.from_tensor(weight, [BLOCK_N, BLOCK_K], w_layout)
    c_desc = TensorDescriptor.from_tensor(out, [BLOCK_M, BLOCK_N], c_layout)
    tiles = triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    _pingpong_kernel[(min(sms, tiles),)](
        a_desc, w_desc, c_desc, out, bias if bias is not None else out, M, N, K, bias is not None,
        {"": 0, "gelu": 1, "gelu_tanh": 3}[act], accumulate, group_m, stages, debug, num_warps=4, maxnreg=168)
    return out


def compile_only():
    """Compile every variant for sm_90 on this machine (no GPU): catches Gluon errors early."""
    import time

    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    a_l, w_l, c_l = _layouts("float16")
    for has_bias, act, acc in [tuple(v) for v in COMPILE_VARIANTS]:
        sig = {"a_desc": f"tensordesc<fp16[{BLOCK_M}, {BLOCK_K}],{a_l!r}>",
               "w_desc": f"tensordesc<fp16[{BLOCK_N}, {BLOCK_K}],{w_l!r}>",
               "c_desc": f"tensordesc<fp16[{BLOCK_M}, {BLOCK_N}],{c_l!r}>",
               "C": "*fp16", "BIAS": "*fp16", "M": "i32", "N": "i32", "K": "i32"}
        const = dict(HAS_BIAS=has_bias, ACT=act, ACCUMULATE=acc, GROUP_M=8, STAGES=4, DEBUG=0)
        sig.update({k: "constexpr" for k in const})
        t0 = time.time()
        out = triton.compile(GluonASTSource(_pingpong_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 4, "maxnreg": 168})
        print(f"bias={has_bias} act={act} accumulate={acc}: compiled in {time.time() - t0:.1f} s, "
              f"shared {out.metadata.shared} B")


def main(shapes):
    import torch

    from engine.compile import _graphed
    from engine.timing import measure
    from modeling import kernels
    from modeling.config import vit_config
    from modeling.ops import parse_gemm_tile
    dev = torch.device("cuda")

    def timed(fn):
        return measure(_graphed(fn, 3), dev, warmup_s=0.05, min_iters=10, max_iters=100, budget_s=0.3).median_ms / 3
    for name, batch in shapes:
        cfg = vit_config(name, "ait")
        M, D, H = int(batch) * cfg.seq_len, cfg.embed_dim, cfg.mlp_hidden
        g = torch.Generator(device=dev).manual_seed(0)
        rnd = lambda *s, scale=1.0: (torch.randn(*s, device=dev, generator=g) * scale).half()  # noqa: E731
        x, hidden = rnd(M, D), rnd(M, H)
        print(f"== {name} batch {batch} (M={M})")
        for site, a, w, b, act, acc in (
                ("qkv", x, rnd(3 * D, D, scale=D ** -0.5), rnd(3 * D), "", False),
                ("fc1+gelu(tanh)", x, rnd(H, D, scale=D ** -0.5), rnd(H), "gelu_tanh", False),
                ("proj+=", x, rnd(D, D, scale=D ** -0.5 / 64), None, "", True),
                ("fc2+=", hidden, rnd(D, H, scale=H ** -0.5 / 64), None, "", True)):
            flops = 2 * M * a.shape[1] * w.shape[0]
            stream = rnd(M, w.shape[0])
            want = a.float() @ w.float().t() + (b.float() if b is not None else 0)
            if act:
                want = torch.nn.functional.gelu(want, approximate="tanh")
            if acc:
                want = want + stream.float()
            out = stream.clone()
            got = pingpong_linear(a, w, b, act, out=out if acc else None, accumulate=acc)
            err = ((got.float() - want).norm() / want.norm()).item()
            if acc:
                ref = lambda: stream.addmm_(a, w.t())  # noqa: E731
            elif act:
                ref = lambda: torch._addmm_activation(b, a, w.t(), use_gelu=True)  # noqa: E731
            else:
                ref = lambda: torch.nn.functional.linear(a, w, b)  # noqa: E731
            rows = [("cuBLAS", timed(ref))]
            rows.append(("pingpong s4", timed(lambda: pingpong_linear(a, w, b, act, out=out, accumulate=acc))))
            for stages, group in ((3, 8), (5, 8), (4, 16)):
                rows.append((f"pingpong s{stages}g{group}", timed(lambda s=stages, g=group: pingpong_linear(
                    a, w, b, act, out=out, accumulate=acc, stages=s, group_m=g))))
            for t in ("m128n256k64w8s3x2f", "m128n256k64w8s3x2fws", "m128n128k64w4s4x1f"):
                tile = parse_gemm_tile(t)
                if not tile.fits():
                    continue
                rows.append((t, timed(lambda tile=tile: kernels.linear(a, w, b, act, out=out if acc else None,
                                                                        accumulate=acc, tile=tile))))
            rows.sort(key=lambda r: r[1])
            print(f"  {site:15s} err {err:.1e}  " + "  ".join(f"{n} {ms * 1e3:.1f}us {flops / ms / 1e9:.0f}TF/s"
                                                             for n, ms in rows))
            sys.stdout.flush()


def smoke(debug, bias=False, act="", M=384, N=512, K=256):
    """One GEMM checked against torch (a crash here poisons the process: run each alone)."""
    import torch
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(M, K, device="cuda", generator=g).half()
    w = (torch.randn(N, K, device="cuda", generator=g) / K ** 0.5).half()
    b = torch.randn(N, device="cuda", generator=g).half() if bias else None
    got = pingpong_linear(x, w, b, act, debug=debug)
    torch.cuda.synchronize()
    want = x.float() @ w.float().t() + (b.float() if bias else 0)
    if act:
        want = torch.nn.functional.gelu(want, approximate="tanh")
    err = ((got.float() - want).norm() / want.norm()).item()
    print(f"smoke debug={debug} bias={bias} act={act!r} {M}x{N}x{K}: rel err {err:.1e}")


if __name__ == "__main__":
    if "--smoke" in sys.argv:  # --smoke DEBUG BIAS ACT M N K
        d, b, a, m, n, k = sys.argv[sys.argv.index("--smoke") + 1:]
        smoke(int(d), b == "1", "" if a == "-" else a, int(m), int(n), int(k))
    elif "--compile-only" in sys.argv:
        compile_only()
    else:
        main([a.split(":") for a in sys.argv[1:]] or [("vit_base_patch16_224", 256), ("vit_large_patch16_384", 256),
                                                      ("vit_base_patch16_224", 64)])
