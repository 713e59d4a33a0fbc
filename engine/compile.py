"""Compile: build the engine for one batch size, choose each op's implementation by measuring
it on this GPU, cache the choices under ./tmp/, and capture the whole forward in one graph.

A cache entry is a JSON file keyed by everything that could change the choice (engine
version, model config, batch, dtype, GPU, torch/Triton/CUDA versions, options); an entry
whose key differs, or that does not parse, is reported and rebuilt, never used.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import torch

from modeling import cublaslt, cuda_attention, ops
from modeling.config import ViTConfig
from modeling.vision_transformer import ActivationArena

from . import EngineError
from .target import Target
from .timing import measure

ENGINE_VERSION = "21"  # 2: the plan names Triton attention and GEMM tiles; 3: fc1 and proj tiles too; 4: ws tiles;
# 5: 128-deep tiles at small M; 6: reduce-add residual epilogue, split K, LayerNorm launch shapes;
# 7: small plans checked end to end against their runners-up; 8: from 8192 rows our tiles must beat cuBLAS by 3%;
# 9: cuBLASLt algorithms beyond its heuristic's first; 10: Triton kernels by programmatic dependent launch;
# 11: explicit cuBLASLt configurations beside the heuristic's (cublaslt.EXTRA_CONFIGS); 12: Triton patchify and
# token assembly (plan.embed); 13: large-batch finalists timed sustained, at the power cap; 14: the CUDA C++
# attention kernel for <= 256 tokens (cuda_attention) among the candidates; 15: its output by TMA store, w2s2 timed again;
# 16: the end-to-end check always tries the library's call beside each of our kernels the plan took;
# 17: ... and credited a swap to the library's call (withdrawn); 18: the combination takes one swap per site;
# 19: a trial, reverted (perf-notes attempt 61); 20: the check descends site by site, the sites' isolated
# timings one pass where it follows, and below 8192 rows only candidates that ever won (attempt 64);
# 21: ... over candidates besides the plan's own pick, the library's however it timed alone (20 never tried
# cuBLAS's GELU epilogue where a short pass had put the separate GELU first)
DEFAULT_CACHE_ROOT = Path("tmp")


@dataclass
class Options:
    """User-facing knobs that change what gets compiled."""
    use_graph: Optional[bool] = None     # None: the target's default (on for CUDA, off for ROCm)
    fp16_acc: bool = False               # cuBLAS float16 accumulation (float16 GEMMs only)
    exact_gelu: bool = False             # forbid the tanh-approximate GELU epilogue for erf-GELU models
    deterministic: bool = False          # bitwise-repeatable outputs: no split-K tiles (also when torch's
                                         # deterministic algorithms are on)

    def wants_determinism(self) -> bool:
        return self.deterministic or torch.are_deterministic_algorithms_enabled()

    def key(self) -> dict:
        return {"fp16_acc": self.fp16_acc, "exact_gelu": self.exact_gelu, "deterministic": self.wants_determinism()}


def apply_global_options(options: Options, dtype: torch.dtype):
    """--use-fp16-acc maps to torch's cuBLAS float16-accumulation switch; it affects float16
    GEMMs only (bfloat16 and float32 always accumulate in float32)."""
    if hasattr(torch.backends.cuda.matmul, "allow_fp16_accumulation"):
        torch.backends.cuda.matmul.allow_fp16_accumulation = bool(options.fp16_acc and dtype == torch.float16)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


# --- the cache -------------------------------------------------------------------------------

def cache_dir(cfg: ViTConfig, batch: int, dtype: torch.dtype, root=DEFAULT_CACHE_ROOT) -> Path:
    dt = str(dtype).replace("torch.", "")
    return Path(root) / f"{cfg.model_name}_{cfg.variant}_bs{batch}_{dt}"


def cache_key(cfg: ViTConfig, batch: int, dtype: torch.dtype, target: Target, options: Options,
              use_graph: Optional[bool] = None) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "engine": ENGINE_VERSION, "config": json.loads(cfg.to_json()), "batch": batch,
        "dtype": str(dtype), "gpu": target.name, "target": target.kind, "torch": torch.__version__,
        "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None), "triton": triton_version,
        "cublaslt": cublaslt.version() if target.is_gpu else None,  # the plan names its algorithms by rank
        "options": dict(options.key(), use_graph=use_graph),  # choices timed in or out of a graph differ
    }


def load_cached_plan(directory: Path, key: dict):
    """(plan, None) from a valid matching entry, or (None, why it was not used)."""
    path = directory / "plan.json"
    if not path.exists():
        return None, "no cache entry"
    try:
        entry = json.loads(path.read_text())
        if entry.get("key") != key:
            theirs = entry.get("key", {})
            diff = [k for k in key if theirs.get(k) != key[k]]
            return None, f"stale or foreign cache entry (differs in {', '.join(diff) or 'format'})"
        return ops.Plan(**entry["plan"]), None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        return None, f"unreadable cache entry ({type(err).__name__})"


def save_plan(directory: Path, key: dict, plan: ops.Plan, report: dict):
    from .results import write_json_atomic
    directory.mkdir(parents=True, exist_ok=True)
    write_json_atomic(directory / "plan.json", {"key": key, "plan": plan.as_dict(), "measured": report})


# --- choosing implementations by measuring ---------------------------------------------------

try:
    from triton.errors import TritonError as _TritonError  # compile/resource errors are not RuntimeErrors
except ImportError:  # older Triton
    class _TritonError(Exception):
        pass

_CAPTURE_STREAMS = {}


def capture_stream() -> "torch.cuda.Stream":
    """One side stream per device for every warm-up and capture: cuBLAS keeps a workspace per
    stream for the life of the process, so a fresh stream per capture would leak one each time."""
    device = torch.cuda.current_device()
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream()
    return _CAPTURE_STREAMS[device]


def capture_graph(fn, warmups: int = 1):
    """Warm `fn` up on the capture stream (Triton JIT and library handles stay out of the graph),
    then capture one call of it in a CUDA graph; returns (graph, what the captured call returned)."""
    stream = capture_stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out = fn()
    return graph, out


def _graphed(fn, calls: int = 5):
    """`calls` calls of fn replayed from one graph: timing it leaves out launch overhead, as the
    engine's own graph does."""
    graph, _ = capture_graph(lambda: [fn() for _ in range(calls)])
    return graph.replay


def graphed_ms(fn, device, budget_s: float = 0.12, calls: int = 5) -> float:
    """Milliseconds per call of fn, `calls` calls replayed from one graph: the tools' kernel timings."""
    return measure(_graphed(fn, calls), device, warmup_s=0.05, min_iters=10, max_iters=200,
                   budget_s=budget_s).median_ms / calls


PLAN_SUSTAINS = True    # from LIBRARY_ROWS, finalists are timed sustained (off: tools/switch_ab.py sustain=off)
SUSTAIN_S = 0.24        # per finalist, at large batch: half to let the clock settle, half timed
SUSTAIN_FINALISTS = 3


def _sustained_ms(run, calls: int, estimate_ms: float, seconds: float) -> float:
    """Mean ms per call of `run` (a graph of `calls` calls) replayed back to back for `seconds`,
    the first half untimed: the GPU's power controller sets the clock this kernel earns at the cap
    (from idle the clock held for ~0.2 s, then dropped; for the two winners checked, 0.24 s read within
    0.5% of 2 s: perf-notes attempt 45)."""
    replays = max(3, int(seconds / 2 / max(estimate_ms * calls / 1e3, 1e-5)))
    for _ in range(replays):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / (replays * calls)


def _fastest(candidates: dict, device, use_graph: bool, close: float = 0.2, rounds: int = 2,
             site_s: float = 0.6, sustain_s: float = 0.0, settle: bool = True, first: Optional[dict] = None) -> tuple:
    """Time each callable (skipping those that fail here); return (name, {name: ms per call}).
    The first pass gives each at most 0.12 s and all together about `site_s` (a large-batch GEMM
    site has up to eleven library candidates: the compile budget). Up to four candidates within `close`
    of the best are timed again in alternation, `rounds` times, and keep the median of their
    timings: sequential timings drift with the GPU's clock
    under its power cap, one short timing each flipped choices a few percent apart between runs,
    and one transient once timed cuBLASLt's GELU epilogue 40% slow and lost it the plan.

    With `sustain_s` (large batches, in graphs) the first SUSTAIN_FINALISTS instead run back to back
    for `sustain_s` each and the winner is the fastest of them there: every large-batch kernel runs
    at the H100's power cap, where a short timing, taken at the clock the previous kernel left,
    favours the power-hungry ones (perf-notes attempt 45).

    settle=False stops after the first pass (its timings only shortlist where the plan is checked end
    to end); `first` is such a pass's {name: ms}, to settle later without timing every one again."""
    times, calls, probes = dict(first or {}), {}, {}

    def replay(name):
        """(a graph replay of the candidate, its calls per replay). A call of 0.2 ms or more is timed
        one per replay, fewer times: its launch overhead is noise, and at large batch five per replay
        made the timing most of a compile. Decided once per candidate; the single-call graph that
        decided it serves the next timing."""
        if name not in calls:
            probe = _graphed(candidates[name], 1)
            long = measure(probe, device, warmup_s=0, min_iters=2, max_iters=2, budget_s=0).median_ms >= 0.2
            calls[name] = 1 if long else 5
            if long:
                probes[name] = probe
        return probes.pop(name, None) or _graphed(candidates[name], calls[name]), calls[name]

    def time_one(name, budget_s, min_iters=10):
        fn = candidates[name]
        if not use_graph:
            return measure(fn, device, warmup_s=0.03, min_iters=min_iters, max_iters=200, budget_s=budget_s).median_ms
        run, n = replay(name)
        return measure(run, device, warmup_s=0.01 if n == 1 else 0.03, min_iters=min_iters, max_iters=200,
                       budget_s=budget_s / 3 if n == 1 else budget_s).median_ms / n
    first_s = min(0.12, site_s / len(candidates))
    for name in ([] if first else candidates):
        try:
            times[name] = time_one(name, first_s)
        except torch.cuda.OutOfMemoryError:
            raise  # the batch does not fit: the sweep marks it OOM rather than caching a partial choice
        except (RuntimeError, ValueError, NotImplementedError, _TritonError):
            continue  # a backend that does not support this shape, dtype or GPU
    if not times:
        raise EngineError(f"no implementation of {', '.join(candidates)} runs here")
    if not settle:
        return min(times, key=times.get), times
    best = min(times.values())
    finalists = sorted((n for n in times if times[n] <= best * (1 + close)), key=times.get)[:4]
    if len(finalists) > 1 and sustain_s > 0 and use_graph:
        # the report keeps the others' short timings: below the finalists' sustained ones, not comparable
        sustained = []
        for n in finalists[:SUSTAIN_FINALISTS]:
            try:
                times[n] = _sustained_ms(*replay(n), times[n], sustain_s)
                sustained.append(n)
            except (RuntimeError, ValueError, NotImplementedError, _TritonError):
                continue
        return min(sustained or finalists[:1], key=times.get), times
    if len(finalists) > 1:
        samples = {n: [times[n]] for n in finalists}
        for _ in range(rounds):
            for n in finalists:
                samples[n].append(time_one(n, 0.05, min_iters=5))
        times.update({n: statistics.median(v) for n, v in samples.items()})
    return min(times, key=times.get), times


def _precompile(launches, threads: int = 8):
    """Compile the Triton candidates side by side before timing them: from a cold Triton cache
    each kernel variant costs ~1 s to compile, most of it in ptxas, which runs outside the GIL.
    A launch that fails here is left for the timing pass to skip."""
    from concurrent.futures import ThreadPoolExecutor
    from modeling import kernels

    def compile_one(launch):
        with kernels.compile_only():
            try:
                launch()
            except Exception:  # noqa: BLE001 (resource limits, unsupported shapes: _fastest skips them)
                pass
    if launches:
        compile_one(launches[0])  # the first one alone: Triton sets up its driver and caches
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(compile_one, launches[1:]))


@torch.no_grad()
def choose_plan(model, batch: int, target: Target, options: Options, use_graph: bool = True) -> tuple:
    """Measure each op's alternatives at this batch's real shapes, using block 0's weights."""
    cfg = model.cfg
    dev, dtype = target.device, model.patch_embed.weight.dtype
    rows = batch * cfg.seq_len
    blk = model.blocks[0]
    phases, started = {}, [time.perf_counter()]

    def phase(name):  # seconds since the last phase ended, kept in the report: where a cold compile goes
        now = time.perf_counter()
        phases[name] = round(now - started[0], 2)
        started[0] = now
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(rows, cfg.embed_dim, device=dev, dtype=dtype, generator=gen)
    n = blk.norm1
    from modeling import kernels
    norms = {"torch": lambda: ops.layer_norm(x, n.weight, n.bias, n.eps, n.shift, "torch"),
             "triton": lambda: ops.layer_norm(x, n.weight, n.bias, n.eps, n.shift, "triton")}
    if dtype != torch.float32:  # launch shapes only matter where the kernel is launch-bound
        for t in kernels.norm_tiles(rows):
            norms[f"triton:{t}"] = lambda t=t: ops.layer_norm(x, n.weight, n.bias, n.eps, n.shift, "triton", tile=t)
    a = torch.randn(rows, cfg.num_heads * cfg.head_dim, device=dev, dtype=dtype, generator=gen)
    sustain = SUSTAIN_S if PLAN_SUSTAINS and rows >= kernels.LIBRARY_ROWS else 0.0
    residual, t_res = _fastest({
        "add": lambda: ops.residual_linear(x, a, blk.proj.weight, "add"),
        "addmm": lambda: ops.residual_linear(x, a, blk.proj.weight, "addmm"),
    }, dev, use_graph, sustain_s=sustain)
    # each block GEMM: cuBLAS, or our Triton GEMM with one of its tiles (kernels.py)
    tiles = kernels.gemm_tiles(rows, options.wants_determinism()) if kernels.gemm_supported(
        dev, dtype, cfg.embed_dim, cfg.mlp_hidden, 3 * cfg.num_heads * cfg.head_dim) else ()
    h = torch.randn(rows, cfg.mlp_hidden, device=dev, dtype=dtype, generator=gen)
    qkv = torch.randn(rows, 3 * cfg.num_heads * cfg.head_dim, device=dev, dtype=dtype, generator=gen)
    f1 = blk.fc1
    fc1 = {"separate": lambda: ops.linear_gelu(x, f1.weight, f1.bias, cfg.act, "separate")}
    # the tanh-GELU epilogue is an approximation below low-precision rounding, not below float32's
    tanh_ok = cfg.act == "gelu_tanh" or (not options.exact_gelu and dtype != torch.float32)
    if tanh_ok:
        fc1["epilogue"] = lambda: ops.linear_gelu(x, f1.weight, f1.bias, cfg.act, "epilogue")
    ours = "triton" if tanh_ok else "triton_erf"

    def usable(tile, accumulate):  # its shared memory holds this epilogue; split K only accumulates
        tile = ops.parse_gemm_tile(tile)
        return tile.fits() and (accumulate or tile.split_k == 1)
    # our fc1 tiles only where cuBLAS's tanh epilogue may not run: beside it they never won (121 plans below
    # LIBRARY_ROWS, engines 15-20; perf-notes attempt 64), and each is a kernel to compile cold
    triton_fc1 = {f"{ours}:{t}": (lambda t=t: ops.linear_gelu(x, f1.weight, f1.bias, cfg.act, ours, t))
                  for t in tiles if usable(t, False) and not tanh_ok}

    def gemm_tiled(run_tile, accumulate=False):
        return {t: (lambda t=t: run_tile(t)) for t in tiles if usable(t, accumulate)}
    w, b = blk.qkv.weight, blk.qkv.bias
    triton_qkv = gemm_tiled(lambda tile: ops.linear(x, w, b, tile))
    triton_proj = gemm_tiled(lambda tile: ops.residual_linear(x, a, blk.proj.weight, residual, tile), True)
    triton_fc2 = gemm_tiled(lambda tile: ops.residual_linear(x, h, blk.fc2.weight, residual, tile), True)

    # from LIBRARY_ROWS, cuBLASLt's other algorithms instead: its heuristic's first, what torch runs,
    # is not always the fastest (tools/lt_algos.py; perf-notes attempt 35)
    lt_ok = (rows >= kernels.LIBRARY_ROWS and dtype in (torch.float16, torch.bfloat16) and not options.fp16_acc
             and cublaslt.version() is not None)

    def lt(weight, epilogue="none", residual_form=False):  # "ltN" for each algorithm offered, then the extra configs
        if not lt_ok:
            return ()
        n, k = weight.shape
        problem = cublaslt.Problem(rows, n, k, dtype, epilogue, residual_form)
        try:
            return cublaslt.names(problem, extra=cublaslt.PLAN_TIMES_EXTRA_CONFIGS)
        except cublaslt.CublasLtError:
            return ()
    lt_qkv = {t: (lambda t=t: ops.linear(x, w, b, t)) for t in lt(w, "bias")}
    lt_proj = {t: (lambda t=t: ops.residual_linear(x, a, blk.proj.weight, residual, t))
               for t in lt(blk.proj.weight, residual_form=True)}
    lt_fc2 = {t: (lambda t=t: ops.residual_linear(x, h, blk.fc2.weight, residual, t))
              for t in lt(blk.fc2.weight, residual_form=True)}
    if tanh_ok:
        fc1.update({f"epilogue:{t}": (lambda t=t: ops.linear_gelu(x, f1.weight, f1.bias, cfg.act, "epilogue", t))
                    for t in lt(f1.weight, "gelu_bias")})

    attn_out = torch.empty(qkv.shape[0], cfg.num_heads * cfg.head_dim, device=dev, dtype=dtype)

    def attention_with(backend, tile=""):
        def run():  # one output buffer: cuda_attention's TMA descriptors are made per address, before capture
            with ops.sdpa_backend(backend):
                return ops.attention(qkv, batch, cfg.num_heads, cfg.head_dim, backend, tile, out=attn_out)
        return run
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 132
    cuda_attn = {}
    if (cuda_attention.PLAN_OFFERS and cuda_attention.supported(cfg.seq_len, cfg.head_dim, dtype, dev)
            and batch * cfg.num_heads >= sms):
        # its CTAs loop over the heads: with fewer heads than SMs it never won (session 16)
        cuda_attn = {f"cuda:{variant}": attention_with("cuda", variant)
                     for variant in cuda_attention.variants(batch * cfg.num_heads, sms)}
    sdpa, triton_attention = {}, {}
    for backend in target.attention_backends:
        if cuda_attn and backend in ("flash", "efficient"):
            continue  # never chosen where the CUDA kernel runs (perf-notes attempt 51): less to time cold
        if cuda_attn and backend == "triton" and batch * cfg.num_heads >= cuda_attention.MANY_HEADS_PER_SM * sms:
            continue  # 1.4-1.6x behind the CUDA kernel there (attempts 53, 55): three compiles less
        if backend != "triton":
            sdpa[backend] = attention_with(backend)
        elif dtype != torch.float32:  # the Triton kernel computes in float16/bfloat16 tiles
            for tile in kernels.attention_tiles(batch, cfg.seq_len, cfg.head_dim, dev):
                triton_attention[f"triton:{tile}"] = attention_with("triton", str(tile))
    triton_norms = {k: v for k, v in norms.items() if k.startswith("triton")}
    # the embedding's kernels are not timed (below) but compile here, beside the others, not at capture
    images = torch.empty(batch, cfg.in_chans, *cfg.img_size, device=dev, dtype=dtype)
    tokens = torch.empty(batch * cfg.num_patches, cfg.embed_dim, device=dev, dtype=dtype)
    embed = {"patchify": lambda: ops.patchify(images, cfg.patch_size, impl="triton"),
             "assemble": lambda: ops.assemble_tokens(tokens, model.pos_patch, model.prefix, batch, out=x,
                                                     impl="triton")}
    phase("setup")
    _precompile([launch for site in (triton_fc1, triton_qkv, triton_proj, triton_fc2, triton_attention, triton_norms,
                                     embed, cuda_attn) for launch in site.values()])
    phase("precompile")

    # where the plan is checked end to end (a short forward, in a graph), the isolated timings only
    # shortlist its candidates: their first pass is enough, and settling every site's close ones again
    # (up to four, twice each) cost up to 1.5 s of a small batch's compile (perf-notes attempt 64)
    sites = {"norm": norms, "mlp_act": {**fc1, **triton_fc1},
             "qkv": {"cublas": lambda: ops.linear(x, w, b), **lt_qkv, **triton_qkv},
             "proj": {"cublas": lambda: ops.residual_linear(x, a, blk.proj.weight, residual), **lt_proj, **triton_proj},
             "fc2": {"cublas": lambda: ops.residual_linear(x, h, blk.fc2.weight, residual), **lt_fc2, **triton_fc2},
             "attention": {**sdpa, **triton_attention, **cuda_attn}}
    defer = use_graph and not sustain  # (sustained timings are not second-guessed by a short check)
    picks, report = {}, {}
    for site, candidates in sites.items():
        picks[site], report[site] = _fastest(candidates, dev, use_graph, sustain_s=sustain, settle=not defer)
        phase(site)
    check = defer and estimated_forward_ms(report, cfg.depth) <= REFINE_MAX_MS
    if defer and not check:
        for site, candidates in sites.items():
            picks[site], report[site] = _fastest(candidates, dev, use_graph, first=report[site])
        phase("settle")
    # the embedding's two copies are not timed: our kernels ran at the copy floor, torch's at 38-54% of
    # its bandwidth, at every size measured (perf-notes attempt 44)
    plan = ops.Plan(residual=residual, embed="triton")
    for site, name in picks.items():
        plan = with_choice(plan, site, name)
    return plan, {**report, "residual": t_res, "phases_s": phases, "sustained_s": sustain, "check_end_to_end": check}


# --- checking the plan end to end --------------------------------------------------------------
# Each op's choice above is timed alone, on block 0's shapes, back to back with itself. In the
# whole graph a candidate runs between other kernels (caches, clocks, launch overlap), and at small
# batch the isolated order says little: at ViT-B/16 batch 2 two QKV tiles 0.3 us apart alone were 26 us
# apart end to end, and checks that tried only the closest runners-up kept picks 2-5% slower end to
# end than one they never tried (perf-notes attempts 31, 57, 60, 61). So where a forward is short, the
# plan descends site by site: each site's few fastest candidates of ours and the library's fastest are
# captured whole, in the plan as it stands, and timed against it; the fastest is kept before the next
# site. (At large batch the same idea added up to 3 s of compile and its short timings were noisy:
# perf-notes attempt 33; there the plan times the library's own algorithms instead, kernels.LIBRARY_ROWS.)

PLAN_SITES = ("mlp_act", "qkv", "proj", "fc2", "attention", "norm")
DESCENT_ORDER = ("qkv", "proj", "fc2", "mlp_act", "norm", "attention")  # the GEMMs' picks moved most end to end
REFINE_MAX_MS = 4.0   # estimated forward above which the end-to-end check is not worth its compile time
DESCENT_REACH = 0.30  # a kernel of ours more than this much slower alone than its site's best is not tried
DESCENT_OURS = 3      # of our kernels per site, the fastest alone besides the plan's own pick
DESCENT_LIBRARY = 1   # of the libraries' calls per site, likewise


def with_choice(plan: ops.Plan, site: str, name: str) -> ops.Plan:
    """`plan` with one site's implementation replaced by the candidate `name` as choose_plan names it."""
    impl, _, tile = name.partition(":")
    if site == "norm":
        return replace(plan, norm=impl, norm_tile=tile)
    if site == "mlp_act":
        return replace(plan, mlp_act=impl, fc1_tile=tile)
    if site == "attention":
        return replace(plan, attention=impl, attention_tile=tile)
    if site in ("qkv", "proj", "fc2"):
        return replace(plan, **{f"{site}_tile": "" if name == "cublas" else name})
    raise KeyError(f"no plan site {site!r}")


def estimated_forward_ms(report: dict, depth: int) -> float:
    """Each site's fastest isolated timing summed over the blocks (two LayerNorms per block)."""
    fastest = {site: min(times.values()) for site, times in report.items() if site in PLAN_SITES and times}
    per_block = 2 * fastest.get("norm", 0.0) + sum(fastest.get(site, 0.0) for site in PLAN_SITES if site != "norm")
    return depth * per_block


def _ours(name: str) -> bool:
    """A candidate that is one of our kernels (Triton or CUDA C++), not a library's (cuBLAS, cuBLASLt,
    cuDNN, SDPA, torch)."""
    return name.startswith(("triton", "cuda")) or (len(name) > 1 and name[0] == "m" and name[1].isdigit())


def site_swaps(plan: ops.Plan, report: dict, site: str, reach: float = DESCENT_REACH, ours: int = DESCENT_OURS,
               library: int = DESCENT_LIBRARY) -> dict:
    """{"site=name": plan with that one swap} for the site's `ours` fastest candidates of ours within
    `reach` of its best isolated time and its `library` fastest library calls however they timed, each
    besides the plan's own pick, fastest alone first. The library's call is always tried: one short
    timing can put it far behind (cuBLAS's GELU epilogue once timed 40% slow alone: `_fastest`), and
    it can win whole where it trailed alone (cuBLAS QKV 3.2% behind alone, 6.8% ahead end to end:
    perf-notes attempt 60; the epilogue 4% ahead of the separate GELU end to end: attempt 64). The
    LayerNorm tries each launch shape of ours, however it timed alone, and not torch's: in ten batch-2
    plans one shape ranked first to fifth of five alone, up to 33% behind the first (attempt 61), and it
    was the fastest end to end in seven of eight."""
    times = report.get(site) or {}
    if not times:
        return {}
    if site == "norm":
        reach, ours, library = float("inf"), len(times), 0
    best = min(times.values())
    others = [name for name in sorted(times, key=times.get) if with_choice(plan, site, name) != plan]
    picked = ([n for n in others if _ours(n) and times[n] <= best * (1 + reach)][:ours]
              + [n for n in others if not _ours(n)][:library])
    return {f"{site}={name}": with_choice(plan, site, name) for name in sorted(picked, key=times.get)}


def refine_plan(plan: ops.Plan, report: dict, time_plans, order=DESCENT_ORDER) -> tuple:
    """Descend site by site (`time_plans({label: plan}) -> {label: ms}`, labels it could not run left
    out): the plan as it stands and its swaps at one site are timed together, the fastest is kept,
    then the next site. Returns (the plan, {label: ms}), where "plan@site" is the plan before that site."""
    times = {}
    for site in order:
        swaps = site_swaps(plan, report, site)
        if not swaps:
            continue
        measured = time_plans({"plan": plan, **swaps})
        times.update({(f"plan@{site}" if label == "plan" else label): ms for label, ms in measured.items()})
        if "plan" in measured:
            fastest = min(measured, key=measured.get)
            plan = swaps.get(fastest, plan)
    return plan, times


def graph_timer(model, batch: int, target: Target, rounds: int = 3, budget_s: float = 0.025):
    """time_plans for refine_plan: each plan's whole forward captured in its own graph on one
    activation arena, then timed in alternation, `rounds` times (median kept), so clock drift
    under the power cap lands on every plan alike."""
    cfg, dev = model.cfg, target.device
    dtype = model.patch_embed.weight.dtype

    @torch.no_grad()
    def time_plans(plans: dict) -> dict:
        images = torch.randn(batch, cfg.in_chans, *cfg.img_size, device=dev, dtype=dtype)
        arena = ActivationArena(cfg, batch, dtype, dev)
        graphs = {}
        for label, plan in plans.items():
            model.set_plan(plan)
            try:
                graphs[label], _ = capture_graph(lambda: model(images, arena))
            except (RuntimeError, ValueError, NotImplementedError, _TritonError):
                continue
        samples = {label: [] for label in graphs}
        for _ in range(rounds):
            for label, graph in graphs.items():
                samples[label].append(measure(graph.replay, dev, warmup_s=0.005, min_iters=10, max_iters=400,
                                              budget_s=budget_s).median_ms)
        del graphs
        return {label: statistics.median(v) for label, v in samples.items()}
    return time_plans


# --- the compiled engine ---------------------------------------------------------------------

@dataclass
class CompiledEngine:
    """The engine for one batch size: a model with its plan, replayed from one graph on GPU."""
    model: torch.nn.Module
    batch: int
    target: Target
    use_graph: bool
    plan: ops.Plan
    info: dict = field(default_factory=dict)
    _graph: Optional[object] = None
    _static_in: Optional[torch.Tensor] = None
    _static_out: Optional[torch.Tensor] = None
    _arena: Optional[object] = None

    @property
    def input_shape(self):
        cfg = self.model.cfg
        return (self.batch, cfg.in_chans, *cfg.img_size)

    @property
    def dtype(self):
        return self.model.patch_embed.weight.dtype

    def check_input(self, images: torch.Tensor):
        want = (self.input_shape, self.dtype, self.target.device)
        if not isinstance(images, torch.Tensor):
            raise EngineError(f"input mismatch: expected a tensor of shape {want[0]}, given {type(images).__name__}")
        got = (tuple(images.shape), images.dtype, images.device)
        if got != want:
            raise EngineError(f"input mismatch: expected shape {want[0]} {str(want[1]).replace('torch.', '')} "
                              f"on {want[2]}, given {got[0]} {str(got[1]).replace('torch.', '')} on {got[2]}")

    @torch.no_grad()
    def capture(self):
        shape, dev = self.input_shape, self.target.device
        self._static_in = torch.randn(shape, device=dev, dtype=self.dtype)
        # the activations live in one buffer of this engine's own, not in allocator segments; cached
        # blocks (the plan's timing scratch) go back first, or the arena would be carved out of one
        # and pin its whole segment
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        self._arena = ActivationArena(self.model.cfg, self.batch, self.dtype, dev)
        if not self.use_graph:
            return self
        self._graph, self._static_out = capture_graph(lambda: self.model(self._static_in, self._arena), warmups=2)
        torch.cuda.synchronize()
        return self

    @torch.no_grad()
    def run(self):
        """One forward on the engine's own input buffer (what the benchmark times)."""
        if self._graph is not None:
            self._graph.replay()
            return self._static_out
        return self.model.set_plan(self.plan)(self._static_in, self._arena)  # the model may serve other batch sizes

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        self.check_input(images)
        if self._graph is None:
            return self.model.set_plan(self.plan)(images, self._arena)
        self._static_in.copy_(images)
        self._graph.replay()
        return self._static_out.clone()


def compile_engine(model, batch: int, target: Target, options: Options, cache_root=DEFAULT_CACHE_ROOT,
                   log=print) -> CompiledEngine:
    """Choose (or reuse) the plan for this batch size and capture the graph."""
    cfg = model.cfg
    dtype = model.patch_embed.weight.dtype
    t0 = time.perf_counter()
    apply_global_options(options, dtype)
    use_graph = target.use_graph(options.use_graph)
    info = {"use_graph": use_graph}
    if not target.is_gpu:
        plan = ops.Plan()  # the CPU runs the plain-PyTorch reference path
        info["plan_source"] = "reference (CPU)"
    else:
        directory = cache_dir(cfg, batch, dtype, cache_root)
        key = cache_key(cfg, batch, dtype, target, options, use_graph)
        plan, why = load_cached_plan(directory, key)
        if plan is not None:
            info["plan_source"] = f"cached ({directory})"
        else:
            if why != "no cache entry":
                log(f"note: {directory}: {why}; rebuilding")
            t_plan = time.perf_counter()
            plan, report = choose_plan(model.set_plan(ops.Plan()), batch, target, options, use_graph)
            if report.get("check_end_to_end"):
                t_check = time.perf_counter()
                plan, report["end_to_end"] = refine_plan(plan, report, graph_timer(model, batch, target))
                report["phases_s"]["end_to_end"] = round(time.perf_counter() - t_check, 2)
            info["plan_s"] = round(time.perf_counter() - t_plan, 2)
            save_plan(directory, key, plan, report)
            info["plan_source"] = f"measured, saved to {directory}"
            info["measured"] = report
    model.set_plan(plan)
    engine = CompiledEngine(model, batch, target, use_graph, plan, info).capture()
    info["compile_s"] = round(time.perf_counter() - t0, 2)
    return engine
