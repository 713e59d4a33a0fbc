"""cuBLASLt called directly, so the plan can choose among its algorithms instead of taking the
first one its heuristic ranks (what torch.addmm and torch._addmm_activation do).

cuBLASLt ranks algorithms by a model of the GPU, not by running them; with an epilogue (bias,
GELU) or at power-capped large batch the first is not always the fastest. This module asks the
heuristic for its top few, and runs any one of them. The plan (engine/compile.py) times them.

Row-major PyTorch GEMMs in cuBLAS's column-major terms: y (M, N) = x (M, K) @ w (N, K)^T is
y^T (N x M, ld N) = w^T (w read as K x N, transposed) @ x^T (K x M). The bias is then a vector
over y^T's rows, as cuBLASLt's bias epilogues want. The residual form y += x @ w^T is C = D = y
with beta = 1.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

# cublasLt.h / library_types.h enum values (stable across CUDA 12 and 13)
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_COMPUTE_32F = 68
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER, _DESC_BIAS_DATA_TYPE = 3, 4, 7, 8, 26
_OP_N, _OP_T = 0, 1
EPILOGUES = {"none": 1, "bias": 4, "gelu_bias": 32 | 4}   # DEFAULT, BIAS, GELU(tanh) then BIAS
_PREF_MAX_WORKSPACE_BYTES = 1
_CAP_SPLITK, _CAP_SWIZZLE, _CAP_TILE_IDS, _CAP_CUSTOM_MAX, _CAP_EPILOGUE_MASK, _CAP_STAGES_IDS = 0, 2, 6, 7, 12, 13
_CONFIG_ATTRS = (("id", 0, ctypes.c_uint32), ("tile", 1, ctypes.c_uint32), ("splitk", 2, ctypes.c_uint32),
                 ("swizzle", 4, ctypes.c_uint32), ("custom", 5, ctypes.c_uint32), ("stages", 6, ctypes.c_uint32),
                 ("cluster", 8, ctypes.c_uint16), ("inner", 7, ctypes.c_uint16))
_CONFIG = {name: (attr, ctype) for name, attr, ctype in _CONFIG_ATTRS}
ALGORITHMS = 8                   # the heuristic's top few the plan times (it offered 8 at every ViT shape tried)
# Configurations outside the heuristic's eight, by epilogue ("residual": C = D): (algorithm id, tile,
# stages, cluster shape, CTA swizzling, custom option) as cuBLASLt 13.1 numbers them, the best of ~100-300
# timed alone per site at batch 256 (tools/lt_configs.py, perf-notes attempt 38); each is kept only where
# cublasLtMatmulAlgoCheck accepts it for the shape at hand. The plan times them beside the heuristic's
# picks (an end-to-end A/B at batch 256: ViT-L/16 3.9%, ViT-B/16 4.6% faster, perf-notes attempt 39);
# tools/switch_ab.py ltextra=off turns them off to compare.
PLAN_TIMES_EXTRA_CONFIGS = True
EXTRA_CONFIGS = {
    "gelu_bias": ((66, 29, 35, 3, 0, 1), (66, 209, 35, 3, 0, 5)),
    "bias": ((66, 422, 35, 3, 0, 5), (66, 472, 35, 5, 0, 7)),
    "residual": ((66, 23, 35, 3, 0, 5), (66, 407, 35, 3, 0, 1)),
}
MAX_WORKSPACE_BYTES = 32 << 20   # what the heuristic may ask for; each algorithm gets only what it needs


class _Algo(ctypes.Structure):
    _fields_ = [("data", ctypes.c_uint64 * 8)]


class _HeuristicResult(ctypes.Structure):
    _fields_ = [("algo", _Algo), ("workspace", ctypes.c_size_t), ("state", ctypes.c_int),
                ("waves", ctypes.c_float), ("reserved", ctypes.c_int * 4)]


class CublasLtError(RuntimeError):
    pass


@functools.lru_cache(maxsize=None)
def _lib():
    """The libcublasLt torch loaded with libcublas (found in this process's memory map). No GEMM is
    run to load it: a cuBLAS call on a new stream costs that stream a 32 MiB workspace."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        raise CublasLtError("cuBLASLt needs an NVIDIA GPU")
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcublasLt.so" in line}
    if not paths:
        raise CublasLtError("libcublasLt is not loaded in this process")
    lib = ctypes.CDLL(sorted(paths)[0])
    handle = ctypes.c_void_p()
    _check(lib.cublasLtCreate(ctypes.byref(handle)), "cublasLtCreate")
    return lib, handle


def _check(status: int, what: str):
    if status != 0:
        raise CublasLtError(f"{what} failed with cublasStatus {status}")


def version():
    """cuBLASLt's version number (it can change under the same torch), or None without one."""
    try:
        lib, _ = _lib()
    except (CublasLtError, OSError):
        return None
    lib.cublasLtGetVersion.restype = ctypes.c_size_t
    return lib.cublasLtGetVersion()


@functools.lru_cache(maxsize=None)
def _workspace(device: int, nbytes: int, stream: int) -> torch.Tensor:
    # kept for the process: a graph captured with this pointer replays into it. One per stream, as
    # cuBLAS keeps its own: graphs captured on different streams may replay at the same time
    return torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}")


@dataclass(frozen=True)
class Problem:
    """One GEMM shape and epilogue; `residual`: y += x @ w^T (beta = 1), no bias."""
    m: int
    n: int
    k: int
    dtype: torch.dtype
    epilogue: str = "none"
    residual: bool = False


class _Descriptors:
    """The cuBLASLt descriptors of one Problem; built once, kept for the life of the process."""

    def __init__(self, p: Problem):
        lib, self.handle = _lib()
        self.lib = lib
        self.data = data = {torch.float16: _CUDA_R_16F, torch.bfloat16: _CUDA_R_16BF}[p.dtype]
        self.desc = ctypes.c_void_p()
        _check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), _COMPUTE_32F, _CUDA_R_32F), "MatmulDescCreate")
        for attr, value in ((_DESC_TRANSA, _OP_T), (_DESC_TRANSB, _OP_N), (_DESC_EPILOGUE, EPILOGUES[p.epilogue])):
            v = ctypes.c_int32(value)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, attr, ctypes.byref(v), 4), "MatmulDescSetAttribute")
        if p.epilogue != "none":
            v = ctypes.c_int32(data)
            _check(lib.cublasLtMatmulDescSetAttribute(self.desc, _DESC_BIAS_DATA_TYPE, ctypes.byref(v), 4),
                   "bias data type")
        self.a, self.b, self.c = (self._layout(data, rows, cols) for rows, cols in
                                  ((p.k, p.n), (p.k, p.m), (p.n, p.m)))

    def init(self, algo_id: int) -> _Algo:
        """Algorithm `algo_id` for this problem's types, at its default configuration."""
        algo = _Algo()
        _check(self.lib.cublasLtMatmulAlgoInit(self.handle, _COMPUTE_32F, _CUDA_R_32F, self.data, self.data,
                                               self.data, self.data, algo_id, ctypes.byref(algo)), "AlgoInit")
        return algo

    def _layout(self, data, rows, cols):
        layout = ctypes.c_void_p()
        _check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), data, ctypes.c_uint64(rows),
                                                   ctypes.c_uint64(cols), ctypes.c_int64(rows)), "LayoutCreate")
        return layout


@functools.lru_cache(maxsize=None)
def _descriptors(p: Problem) -> _Descriptors:
    return _Descriptors(p)


@functools.lru_cache(maxsize=None)
def algorithms(p: Problem, count: int = ALGORITHMS) -> tuple:
    """The heuristic's top `count` (algorithm, workspace bytes) for this problem, best-ranked first."""
    d = _descriptors(p)
    pref = ctypes.c_void_p()
    _check(d.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
    size = ctypes.c_uint64(MAX_WORKSPACE_BYTES)
    _check(d.lib.cublasLtMatmulPreferenceSetAttribute(pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(size), 8),
           "PreferenceSetAttribute")
    results = (_HeuristicResult * count)()
    found = ctypes.c_int()
    _check(d.lib.cublasLtMatmulAlgoGetHeuristic(d.handle, d.desc, d.a, d.b, d.c, d.c, pref, count, results,
                                                ctypes.byref(found)), "AlgoGetHeuristic")
    d.lib.cublasLtMatmulPreferenceDestroy(pref)
    return tuple((r.algo, r.workspace) for r in results[:found.value] if r.state == 0)


def algorithm_ids(p: Problem, count: int = 256) -> list:
    """Every algorithm id cuBLASLt has for this problem's types (not all fit its shape or epilogue)."""
    d = _descriptors(p)
    ids = (ctypes.c_int * count)()
    found = ctypes.c_int()
    _check(d.lib.cublasLtMatmulAlgoGetIds(d.handle, _COMPUTE_32F, _CUDA_R_32F, d.data, d.data, d.data, d.data,
                                          count, ids, ctypes.byref(found)), "AlgoGetIds")
    return list(ids[:found.value])


def capabilities(p: Problem, algo_id: int) -> dict:
    """What one algorithm id can be configured with: tile and stage ids, CTA swizzling, custom options,
    split K, and its epilogue mask."""
    d = _descriptors(p)
    algo = d.init(algo_id)
    caps = {}
    for name, attr in (("tiles", _CAP_TILE_IDS), ("stages", _CAP_STAGES_IDS)):
        size = ctypes.c_size_t()
        _check(d.lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, None, ctypes.c_size_t(0),
                                                       ctypes.byref(size)), "AlgoCapGetAttribute (size)")
        values = (ctypes.c_uint32 * max(1, size.value // 4))()
        _check(d.lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, values, ctypes.sizeof(values),
                                                       ctypes.byref(size)), "AlgoCapGetAttribute")
        caps[name] = list(values[:size.value // 4])
    for name, attr, ctype in (("swizzle", _CAP_SWIZZLE, ctypes.c_uint32), ("custom_max", _CAP_CUSTOM_MAX, ctypes.c_int32),
                              ("splitk", _CAP_SPLITK, ctypes.c_int32), ("epilogues", _CAP_EPILOGUE_MASK, ctypes.c_uint32)):
        value, size = ctype(), ctypes.c_size_t()
        _check(d.lib.cublasLtMatmulAlgoCapGetAttribute(ctypes.byref(algo), attr, ctypes.byref(value),
                                                       ctypes.sizeof(value), ctypes.byref(size)), "AlgoCapGetAttribute")
        caps[name] = value.value
    return caps


@functools.lru_cache(maxsize=None)  # called on every forward outside a CUDA graph
def configured(p: Problem, algo_id: int, tile: int, stages: int, cluster: int = 0, swizzle: int = 0,
               custom: int = 0):
    """(algorithm, workspace bytes) for one explicit configuration, or None where cuBLASLt's check
    refuses it for this problem (shape, epilogue, alignment, workspace over MAX_WORKSPACE_BYTES)."""
    d = _descriptors(p)
    algo = d.init(algo_id)
    for name, number in (("tile", tile), ("stages", stages), ("cluster", cluster), ("swizzle", swizzle),
                         ("custom", custom), ("splitk", 1)):
        attr, ctype = _CONFIG[name]
        value = ctype(number)
        if d.lib.cublasLtMatmulAlgoConfigSetAttribute(ctypes.byref(algo), attr, ctypes.byref(value),
                                                      ctypes.sizeof(value)) != 0:
            return None
    result = _HeuristicResult()
    if d.lib.cublasLtMatmulAlgoCheck(d.handle, d.desc, d.a, d.b, d.c, d.c, ctypes.byref(algo),
                                     ctypes.byref(result)) != 0 or result.state != 0:
        return None
    if result.workspace > MAX_WORKSPACE_BYTES:
        return None
    return algo, result.workspace


def extra_configs(p: Problem) -> list:
    """The EXTRA_CONFIGS for this problem's epilogue that cuBLASLt accepts for its shape and that are
    not already among the heuristic's picks."""
    offered = {describe(algo) for algo, _ in algorithms(p)}
    keep = []
    for config in EXTRA_CONFIGS.get("residual" if p.residual else p.epilogue, ()):
        found = configured(p, *config)
        if found is not None and describe(found[0]) not in offered:
            keep.append(config)
    return keep


def names(p: Problem, extra: bool = True) -> list:
    """The plan's names (ops.lt_algorithm parses them) of the heuristic's algorithms for this problem,
    "lt0".."lt7", then, with `extra`, of the EXTRA_CONFIGS valid here, "lt66.29.35.3.0.1"."""
    configs = extra_configs(p) if extra else []
    return [f"lt{i}" for i in range(len(algorithms(p)))] + ["lt" + ".".join(map(str, c)) for c in configs]


def describe(algo: _Algo) -> str:
    """The algorithm's configuration (id, tile, split-K, swizzling, custom option, stages, cluster, inner
    shape), for logs and to tell configurations apart."""
    lib, _ = _lib()
    parts = []
    for name, attr, ctype in _CONFIG_ATTRS:
        value = ctype()
        written = ctypes.c_size_t()
        if lib.cublasLtMatmulAlgoConfigGetAttribute(ctypes.byref(algo), attr, ctypes.byref(value),
                                                    ctypes.sizeof(value), ctypes.byref(written)) == 0:
            parts.append(f"{name}{value.value}")
    return "-".join(parts)


def matmul(p: Problem, algo_index: int, x: torch.Tensor, w: torch.Tensor, bias=None, out=None,
           count: int = ALGORITHMS) -> torch.Tensor:
    """act(x @ w^T + bias) per p.epilogue, or out += x @ w^T when p.residual, with the heuristic's
    algorithm number `algo_index` of the heuristic's `count`. x (M, K), w (N, K), out (M, N): contiguous."""
    found = algorithms(p, count)
    if algo_index >= len(found):
        raise CublasLtError(f"cuBLASLt offers {len(found)} algorithms for {p}, not #{algo_index}")
    return run(p, *found[algo_index], x, w, bias, out)


def run(p: Problem, algo: _Algo, nbytes: int, x: torch.Tensor, w: torch.Tensor, bias=None, out=None) -> torch.Tensor:
    """matmul() with a given algorithm and its workspace size (from algorithms() or configured())."""
    d = _descriptors(p)
    if out is None:
        out = torch.empty(p.m, p.n, device=x.device, dtype=p.dtype)
    tensors = (x, w, out) if bias is None else (x, w, out, bias)
    if not all(t.is_contiguous() and t.data_ptr() % 256 == 0 for t in tensors):
        # the heuristic assumed its default: every operand 256-byte aligned (the engine's arena and packed
        # weights are); a smaller alignment could select a kernel that reads out of bounds
        raise CublasLtError("cuBLASLt algorithms here want contiguous, 256-byte-aligned operands")
    if p.epilogue != "none":
        ptr = ctypes.c_void_p(bias.data_ptr())
        _check(d.lib.cublasLtMatmulDescSetAttribute(d.desc, _DESC_BIAS_POINTER, ctypes.byref(ptr), 8), "bias")
    alpha, beta = ctypes.c_float(1.0), ctypes.c_float(1.0 if p.residual else 0.0)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    ws = _workspace(x.device.index, nbytes, stream).data_ptr() if nbytes else None
    _check(d.lib.cublasLtMatmul(d.handle, d.desc, ctypes.byref(alpha), ctypes.c_void_p(w.data_ptr()), d.a,
                                ctypes.c_void_p(x.data_ptr()), d.b, ctypes.byref(beta),
                                ctypes.c_void_p(out.data_ptr()), d.c, ctypes.c_void_p(out.data_ptr()), d.c,
                                ctypes.byref(algo), ctypes.c_void_p(ws), ctypes.c_size_t(nbytes),
                                ctypes.c_void_p(stream)), "cublasLtMatmul")
    return out
