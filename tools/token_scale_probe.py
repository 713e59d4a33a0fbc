"""Can cuBLASLt scale each token's row of a float16 GEMM by its own factor in the epilogue?
(perf-notes attempt 67.)

Why: LayerNorm folds into the GEMM after it, LN(x) W^T + b = rstd * (x W2^T) + b2 with W2 = W diag(gamma)
less each row's mean and b2 = W beta + b (attempt 59). The one piece cuBLAS lacked there was the
per-token factor rstd before the bias and GELU, so attempt 59 put it in the attention kernel (54 us
a layer too slow) and could not fold norm2 at all (fc1's GELU comes after the factor). If the library
applies it, both LayerNorm writes of every block go, with no kernel of ours. Three ways to ask:

- `alpha`: the alpha vector (pointer mode ALPHA_DEVICE_VECTOR_BETA_HOST), one factor per row of D. With
  cuBLAS's rows = tokens, D is (features, tokens) in memory: the output transposed.
- `alpha_row`: the same, D (and C) in row order: the engine's (tokens, features) layout.
- `outer`: the engine's own call with A and B scaled by outer vectors (OUTER_VEC_32F: ones per feature,
  rstd per token), keeping its bias and GELU epilogues. cuBLASLt documents it for FP8.

Each is asked of the heuristic and, where offered, run on a small shape against float32. (Timing one
beside cuBLAS's plain call would follow tools/wgmma_gemm.py's compare().)

    python3 tools/token_scale_probe.py WAY      WAY: alpha, alpha_row or outer

Outcome with cuBLASLt 13.1 on the H100 (2026-12-07): none of the three is offered, for float16 or
bfloat16 (outer: status 7, the alpha ways: status 15). Run it again when cuBLASLt changes.
"""
import ctypes
import sys

import torch
import torch.nn.functional as F

from modeling import cublaslt as lt

WAYS = ("alpha", "alpha_row", "outer")
_DESC_POINTER_MODE, _DESC_A_SCALE_POINTER, _DESC_B_SCALE_POINTER = 2, 17, 18
_DESC_A_SCALE_MODE, _DESC_B_SCALE_MODE = 31, 32
_POINTER_ALPHA_VECTOR_BETA_HOST, _SCALE_OUTER_VEC_32F = 4, 3
_LAYOUT_ORDER, _ORDER_ROW = 1, 1
_EPILOGUE_GELU = 32


def _set(lib, desc, attr, value, ctype=ctypes.c_int32):
    v = ctype(value)
    lt._check(lib.cublasLtMatmulDescSetAttribute(desc, attr, ctypes.byref(v), ctypes.sizeof(v)), f"attribute {attr}")


class ScaledGemm:
    """act(rstd[:, None] * (x @ w^T) + bias) with rstd applied by cuBLASLt, asked `way`'s way.
    `act` is "bias" or "gelu_bias"; the alpha ways have no per-feature bias epilogue (cuBLASLt's bias
    runs along D's rows, the tokens there), so they run without it (a real fold would carry the bias
    in an extra column of x and w)."""

    def __init__(self, way, tokens, features, k, dtype, act):
        self.lib, self.handle = lt._lib()
        self.way, self.act, self.shape = way, act, (tokens, features, k)
        data = {torch.float16: lt._CUDA_R_16F, torch.bfloat16: lt._CUDA_R_16BF}[dtype]
        lib = self.lib
        self.desc = ctypes.c_void_p()
        lt._check(lib.cublasLtMatmulDescCreate(ctypes.byref(self.desc), lt._COMPUTE_32F, lt._CUDA_R_32F), "DescCreate")
        if way == "outer":  # the engine's call: D (features x tokens) = w x^T, A = w, B = x
            _set(lib, self.desc, lt._DESC_TRANSA, lt._OP_T)
            _set(lib, self.desc, lt._DESC_TRANSB, lt._OP_N)
            _set(lib, self.desc, lt._DESC_EPILOGUE, lt.EPILOGUES[act])
            _set(lib, self.desc, lt._DESC_BIAS_DATA_TYPE, data)
            _set(lib, self.desc, _DESC_A_SCALE_MODE, _SCALE_OUTER_VEC_32F)
            _set(lib, self.desc, _DESC_B_SCALE_MODE, _SCALE_OUTER_VEC_32F)
            self.a, self.b, self.d = (self._layout(data, r, c, r) for r, c in ((k, features), (k, tokens), (features, tokens)))
        else:  # D (tokens x features) = x w^T, A = x, B = w; rows of D are tokens
            _set(lib, self.desc, lt._DESC_TRANSA, lt._OP_T)
            _set(lib, self.desc, lt._DESC_TRANSB, lt._OP_N)
            _set(lib, self.desc, lt._DESC_EPILOGUE, _EPILOGUE_GELU if act == "gelu_bias" else lt.EPILOGUES["none"])
            _set(lib, self.desc, _DESC_POINTER_MODE, _POINTER_ALPHA_VECTOR_BETA_HOST)
            self.a = self._layout(data, k, tokens, k)
            self.b = self._layout(data, k, features, k)
            row = way == "alpha_row"
            self.d = self._layout(data, tokens, features, features if row else tokens, row)

    def _layout(self, data, rows, cols, ld, row_order=False):
        layout = ctypes.c_void_p()
        lt._check(self.lib.cublasLtMatrixLayoutCreate(ctypes.byref(layout), data, ctypes.c_uint64(rows),
                                                      ctypes.c_uint64(cols), ctypes.c_int64(ld)), "LayoutCreate")
        if row_order:
            v = ctypes.c_int32(_ORDER_ROW)
            lt._check(self.lib.cublasLtMatrixLayoutSetAttribute(layout, _LAYOUT_ORDER, ctypes.byref(v), 4), "order")
        return layout

    def algorithms(self, count=8):
        pref = ctypes.c_void_p()
        lt._check(self.lib.cublasLtMatmulPreferenceCreate(ctypes.byref(pref)), "PreferenceCreate")
        size = ctypes.c_uint64(lt.MAX_WORKSPACE_BYTES)
        lt._check(self.lib.cublasLtMatmulPreferenceSetAttribute(pref, lt._PREF_MAX_WORKSPACE_BYTES, ctypes.byref(size), 8),
                  "PreferenceSetAttribute")
        results = (lt._HeuristicResult * count)()
        found = ctypes.c_int()
        status = self.lib.cublasLtMatmulAlgoGetHeuristic(self.handle, self.desc, self.a, self.b, self.d, self.d, pref,
                                                         count, results, ctypes.byref(found))
        self.lib.cublasLtMatmulPreferenceDestroy(pref)
        if status != 0:
            return status, []
        return 0, [(r.algo, r.workspace) for r in results[:found.value] if r.state == 0]

    def run(self, algo, nbytes, x, w, bias, rstd, ones, out):
        lib = self.lib
        if self.way == "outer":
            for attr, t in ((lt._DESC_BIAS_POINTER, bias), (_DESC_A_SCALE_POINTER, ones), (_DESC_B_SCALE_POINTER, rstd)):
                _set(lib, self.desc, attr, t.data_ptr(), ctypes.c_void_p)
            alpha, operands = ctypes.byref(ctypes.c_float(1.0)), (w, self.a, x, self.b)
        else:
            alpha, operands = ctypes.c_void_p(rstd.data_ptr()), (x, self.a, w, self.b)
        beta = ctypes.c_float(0.0)
        stream = torch.cuda.current_stream().cuda_stream
        ws = lt._workspace(x.device.index, nbytes, stream).data_ptr() if nbytes else None
        return lib.cublasLtMatmul(self.handle, self.desc, alpha, ctypes.c_void_p(operands[0].data_ptr()), operands[1],
                                  ctypes.c_void_p(operands[2].data_ptr()), operands[3], ctypes.byref(beta),
                                  ctypes.c_void_p(out.data_ptr()), self.d, ctypes.c_void_p(out.data_ptr()), self.d,
                                  ctypes.byref(algo), ctypes.c_void_p(ws), ctypes.c_size_t(nbytes), ctypes.c_void_p(stream))

    def reference(self, x, w, bias, rstd):
        y = rstd[:, None] * (x.float() @ w.float().t())
        if self.way == "outer":
            y = y + bias.float()
        return F.gelu(y, approximate="tanh") if self.act == "gelu_bias" else y

    def result(self, out):
        """The output as (tokens, features), whatever layout D had."""
        tokens, features, _ = self.shape
        return out.view(features, tokens).t() if self.way == "alpha" else out.view(tokens, features)


def operands(tokens, features, k, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(tokens, k, device="cuda", dtype=dtype, generator=g)
    w = (torch.randn(features, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    bias = torch.randn(features, device="cuda", generator=g).to(dtype)
    rstd = torch.rand(tokens, device="cuda", generator=g) * 4 + 0.05  # 1/std spread over 0.05-4.05
    ones = torch.ones(features, device="cuda")
    out = torch.empty(tokens * features, device="cuda", dtype=dtype)
    return x, w, bias, rstd, ones, out


def check(way, dtype, act):
    """Is `way` offered for (392 tokens, 2304 features, K 768), and is its result right?"""
    shape = (392, 2304, 768)
    gemm = ScaledGemm(way, *shape, dtype, act)
    status, found = gemm.algorithms()
    label = f"{way} {str(dtype)[6:]} {act}"
    if status != 0 or not found:
        print(f"{label}: heuristic offers nothing (status {status}, {len(found)} algorithms)", flush=True)
        return False
    ops = operands(*shape, dtype)
    ok = True
    for i, (algo, nbytes) in enumerate(found):
        status = gemm.run(algo, nbytes, *ops)
        if status != 0:
            print(f"{label}: algorithm {i} ({lt.describe(algo)}) refused at run, status {status}", flush=True)
            ok = False
            continue
        torch.cuda.synchronize()
        ref = gemm.reference(*ops[:4])
        err = ((gemm.result(ops[-1]).float() - ref).norm() / ref.norm()).item()
        print(f"{label}: algorithm {i} ({lt.describe(algo)}) relative error {err:.2e}", flush=True)
        ok = ok and err < 1e-2
    return ok


def main(argv):
    if not argv or argv[0] not in WAYS:
        sys.exit(__doc__)
    way = argv[0]
    print(f"cuBLASLt {lt.version()}, {torch.cuda.get_device_name()}", flush=True)
    for dtype in (torch.float16, torch.bfloat16):
        for act in ("bias", "gelu_bias"):
            check(way, dtype, act)


if __name__ == "__main__":
    main(sys.argv[1:])
