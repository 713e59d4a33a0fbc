"""Why an engine whose plan was measured in the same process runs slower at small batch than the
same plan loaded from the cache in a fresh process (perf-notes attempt 36). Each call is one
fresh process: do part of the plan's measuring (PART), then build the engine from the cached
plan in CACHE and time it.

    python3 tools/plan_state.py MODEL:BATCH CACHE PART
    PART: none | full | precompile | norm | attention | gemm | refine   (parts of choose_plan)
          | alloc | empty | ones | triton | graph | graph_alloc | many_graphs | cublas  (single suspects)

With an empty CACHE the engine measures its own plan (the slow case); later calls load it.
After the timing it prints the host's launch time, where the input, arena and first weight
live, a profile of 20 graph replays (CUDA time by kernel; the idle time between kernels, by the
pair around it), and the timing again after 3 s idle. PLAN_STATE_STREAMS=1 also replays on
fresh streams and captures again; PLAN_STATE_LIFECYCLE=1 captures more engines of the same plan
beside or after the first and times each.
"""
from collections import defaultdict
import gc
import os
import sys
import time

import torch

import modeling  # noqa: F401
import weight_utils as wu
from engine import compile as cp
from engine.target import detect
from engine.timing import measure
from modeling import ops
from modeling.config import vit_config

spec, cache, part = sys.argv[1:4]

name, batch = spec.split(":")
batch = int(batch)
target = detect("cuda")
cfg = vit_config(name, "ait")
model = wu.seeded_engine(cfg, torch.float16, target.device)
SITE_OF = {"torch": "norm", "cudnn": "attention", "math": "attention", "cublas": "gemm", "separate": "gemm",
           "add": "gemm"}

real_fastest, real_precompile = cp._fastest, cp._precompile


def fastest(candidates, *args, **kwargs):
    site = next((SITE_OF[k] for k in candidates if k in SITE_OF), "?")
    if part in ("full", site):
        return real_fastest(candidates, *args, **kwargs)
    first = next(iter(candidates))
    return first, {first: 1.0}


cp._fastest = fastest
cp._precompile = lambda launches, threads=8: real_precompile(launches, threads) if part in (
    "full", "precompile") else None
if part == "alloc":  # choose_plan's input tensors, allocated and freed
    gen = torch.Generator(device=target.device).manual_seed(0)
    rows = batch * cfg.seq_len
    tensors = [torch.randn(rows, n, device=target.device, dtype=torch.float16, generator=gen)
               for n in (cfg.embed_dim, cfg.embed_dim, cfg.mlp_hidden, 3 * cfg.embed_dim)]
    del tensors
elif part == "empty":  # the same sizes allocated and freed, no kernel launched
    rows = batch * cfg.seq_len
    tensors = [torch.empty(rows, n, device=target.device, dtype=torch.float16)
               for n in (cfg.embed_dim, cfg.embed_dim, cfg.mlp_hidden, 3 * cfg.embed_dim)]
    del tensors
elif part == "ones":  # one small eager kernel on the default stream, no graph
    x = torch.ones(16, device=target.device)
    torch.cuda.synchronize()
elif part == "triton":  # one Triton kernel launched eagerly
    x = torch.randn(4, cfg.embed_dim, device=target.device, dtype=torch.float16)
    w = torch.ones(cfg.embed_dim, device=target.device)
    ops.layer_norm(x, w, w, 1e-6, None, "triton")
    torch.cuda.synchronize()
elif part == "graph":  # one small graph captured and replayed
    x = torch.ones(16, device=target.device)
    cp.capture_graph(lambda: x + 1)[0].replay()
    torch.cuda.synchronize()
elif part == "graph_alloc":  # the small graph, then choose_plan's input tensors
    x = torch.ones(16, device=target.device)
    cp.capture_graph(lambda: x + 1)[0].replay()
    gen = torch.Generator(device=target.device).manual_seed(0)
    tensors = [torch.randn(batch * cfg.seq_len, cfg.embed_dim, device=target.device, dtype=torch.float16,
                           generator=gen) for _ in range(4)]
    del tensors
elif part == "many_graphs":  # as the plan's timing does: 300 graphs captured, replayed, dropped
    x = torch.ones(1 << 16, device=target.device)
    for _ in range(300):
        cp.capture_graph(lambda: [x.add_(1) for _ in range(5)])[0].replay()
    torch.cuda.synchronize()
elif part == "cublas":  # one cuBLAS GEMM, eagerly
    x = torch.ones(16, 16, device=target.device, dtype=torch.float16)
    (x @ x).sum().item()
elif part != "none":
    cp.apply_global_options(cp.Options(), torch.float16)
    plan, report = cp.choose_plan(model.set_plan(ops.Plan()), batch, target, cp.Options())
    if part == "full":
        cp.refine_plan(plan, report, cp.graph_timer(model, batch, target))
    if part == "refine":  # whole forwards captured and timed, as the end-to-end check does
        cp.graph_timer(model, batch, target)({"a": ops.Plan(norm="triton", residual="addmm", mlp_act="epilogue"),
                                              "b": ops.Plan(norm="triton", residual="addmm")})
cp._fastest, cp._precompile = real_fastest, real_precompile  # an empty CACHE: the real plan, measured here
engine = cp.compile_engine(model, batch, target, cp.Options(), cache_root=cache, log=print)
t = measure(engine.run, target.device, warmup_s=0.3, budget_s=1.0)
print(f"{part:12s} {engine.info['plan_source'][:8]} {t.median_ms:.4f} ms (p10 {t.p10_ms:.4f})", flush=True)
graphs = sum(isinstance(o, torch.cuda.CUDAGraph) for o in gc.get_objects())
t0 = time.perf_counter()
for _ in range(200):
    engine.run()
cpu_us = (time.perf_counter() - t0) * 1e6 / 200
torch.cuda.synchronize()
gpu_us = (time.perf_counter() - t0) * 1e6 / 200
print(f"  host: {cpu_us:.1f} us per replay launched, {gpu_us:.1f} us run; {graphs} CUDA graphs alive")
print(f"  input {engine._static_in.data_ptr():#x} arena {engine._arena.buffer.data_ptr():#x} "
      f"patch weight {model.patch_embed.weight.data_ptr():#x}")
replays = 20
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        engine.run()
    end.record()
    torch.cuda.synchronize()
by_kernel, count = defaultdict(float), defaultdict(int)
for evt in prof.events():
    if evt.device_type == torch.autograd.DeviceType.CUDA:
        by_kernel[evt.name[:70]] += evt.time_range.elapsed_us() / replays
        count[evt.name[:70]] += 1
kernel_us = sum(by_kernel.values())
wall_us = start.elapsed_time(end) * 1e3 / replays
print(f"  profiled: {wall_us:.1f} us per replay, kernels {kernel_us:.1f} us, gaps {wall_us - kernel_us:.1f} us")
for name, us in sorted(by_kernel.items(), key=lambda kv: -kv[1])[:12]:
    print(f"  {us:8.2f} us  x{count[name] // replays:<3d} {name}")
# the idle time before each kernel, by the pair of kernels around it
kernels = sorted((e.time_range.start, e.time_range.end, e.name[:40]) for e in prof.events()
                 if e.device_type == torch.autograd.DeviceType.CUDA)
gap_sum, gap_n = defaultdict(float), defaultdict(int)
for (_, end_prev, prev), (start, _, name) in zip(kernels, kernels[1:]):
    gap_sum[(prev, name)] += start - end_prev
    gap_n[(prev, name)] += 1
print("  idle before a kernel, mean us (count per replay), by the kernel before -> the kernel:")
for pair, total in sorted(gap_sum.items(), key=lambda kv: -kv[1])[:8]:
    print(f"  {total / gap_n[pair]:7.2f} us ({gap_n[pair] / replays:5.1f}) {pair[0]} -> {pair[1]}")
print(f"  plan {engine.plan}")
time.sleep(3)
t = measure(engine.run, target.device, warmup_s=0.3, budget_s=1.0)
print(f"  after 3 s idle: {t.median_ms:.4f} ms", flush=True)

if os.environ.get("PLAN_STATE_STREAMS"):  # does a fresh stream for the replays or the capture help?
    def timed(run, stream=None):
        with torch.cuda.stream(stream or torch.cuda.current_stream()):
            return measure(run, target.device, warmup_s=0.3, budget_s=1.0).median_ms
    print(f"  replayed on a new stream: {timed(engine.run, torch.cuda.Stream()):.4f} ms")
    print(f"  replayed on a high-priority stream: {timed(engine.run, torch.cuda.Stream(priority=-1)):.4f} ms")
    cp._CAPTURE_STREAMS.clear()
    again = cp.CompiledEngine(model, batch, target, True, engine.plan, {}).capture()
    print(f"  captured again on a new capture stream: {timed(again.run):.4f} ms, "
          f"on a new stream {timed(again.run, torch.cuda.Stream()):.4f} ms")

if os.environ.get("PLAN_STATE_LIFECYCLE"):  # is a graph slow when another graph lives as it is captured?
    def ms(e):
        return measure(e.run, target.device, warmup_s=0.2, budget_s=0.5).median_ms

    plan = engine.plan

    def capture():
        return cp.CompiledEngine(model, batch, target, True, plan, {}).capture()
    second = capture()
    print(f"  second engine (the first alive): {ms(second):.4f} ms; the first now {ms(engine):.4f} ms")
    del second
    gc.collect()
    third = capture()
    print(f"  third (the first alive, the second dropped): {ms(third):.4f} ms")
    del engine, third
    gc.collect()
    torch.cuda.synchronize()
    fourth = capture()
    print(f"  fourth (none alive): {ms(fourth):.4f} ms")
    x = torch.ones(16, device=target.device)
    small, _ = cp.capture_graph(lambda: x + 1)
    print(f"  fourth with a small graph captured after it: {ms(fourth):.4f} ms")
    del fourth
    gc.collect()
    fifth = capture()
    print(f"  fifth (the small graph alive): {ms(fifth):.4f} ms")
