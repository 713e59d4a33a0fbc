"""The benchmark sweep both benchmarks share: for each batch size build a runner, time it with
the one harness, and write a row with the one results writer. A batch size that runs the GPU
out of memory becomes an OOM row and the sweep goes on; the caller learns the sweep was partial."""
from __future__ import annotations

import gc
import sys
from typing import Callable, Iterable, List, Optional

import torch

from .distributed import FAILED, Group, PeerFailed
from .results import environment, record
from .target import Target
from .timing import measure

GPU_SWEEP = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CPU_SWEEP = [1, 2, 4]


def sweep_sizes(target: Target) -> List[int]:
    return list(GPU_SWEEP if target.is_gpu else CPU_SWEEP)


def timing_for(time_budget: float) -> dict:
    """measure()'s knobs for --time-budget; the default 2 s is measure()'s own default."""
    return {"budget_s": time_budget, "warmup_s": min(0.5, time_budget / 4)}


def announce(group: Group, sizes: List[int], asked: List[int], say):
    """Under torchrun, say how the global batch is split (and which sweep sizes cannot be)."""
    if not group.enabled:
        return
    say(f"data parallel: {group.world_size} processes, each runs global batch / {group.world_size}; "
        f"global batch sizes {sizes}")
    skipped = [b for b in asked if b not in sizes]
    if skipped:
        say(f"note: batch sizes {skipped} do not split over {group.world_size} devices; skipped")


def progress(items, desc: str, enabled: Optional[bool] = None):
    """A progress bar on a terminal, nothing in logs."""
    items = list(items)
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="batch", file=sys.stderr, leave=False)


def beside(bar, log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` that lifts a progress bar off the terminal while it prints, so the two do not run together."""
    if not hasattr(bar, "external_write_mode"):
        return log

    def write(message: str):
        with bar.external_write_mode(file=sys.stderr):
            log(message)
    return write


def is_oom(err: BaseException) -> bool:
    """A GPU out-of-memory error, also one that torch.compile or a library wrapped in its own."""
    for _ in range(8):  # the error, then what it was raised from
        if err is None:
            return False
        text = str(err)
        if isinstance(err, torch.cuda.OutOfMemoryError) or (
                isinstance(err, RuntimeError) and ("CUDA out of memory" in text or "CUDA error: out of memory" in text
                                                   or "ALLOC_FAILED" in text)):
            return True
        err = err.__cause__ or err.__context__
    return False


def run_sweep(engine: str, mode: str, cfg, target: Target, dtype, sizes: Iterable[int],
              make_runner: Callable[[int], tuple], out_dir, stem: str, source: str,
              log=print, timing_kwargs=None, group: Optional[Group] = None) -> bool:
    """Time `make_runner(batch) -> (fn, info)` at each size; returns True if every size ran.

    With a torchrun `group` of several processes, `sizes` are global batches: each rank times
    `make_runner(batch // world)` on its own device, all ranks starting each timed loop together;
    rank 0 writes one aggregated row (slowest rank's median; QPS of the global batch) and one
    row per rank. Every rank returns the same answer."""
    group = group or Group()
    complete = True
    timing_kwargs = timing_kwargs or {}
    bar = progress(list(sizes), f"{engine} {mode}", enabled=None if group.is_main else False)
    log = beside(bar, log)
    for batch in bar:
        row = _run_one(engine, mode, cfg, target, dtype, source, batch, make_runner, log, timing_kwargs, group)
        if not group.enabled:
            complete &= row["latency_ms"] != "OOM"
            record(out_dir, stem, row)
            continue
        rows = group.all_gather_object(row)
        summary = aggregate(rows, cfg)
        complete &= summary["latency_ms"] != "OOM"
        if group.is_main:
            if summary["latency_ms"] != "OOM":
                log(f"{engine} {mode} batch {batch} on {group.world_size} devices: {summary['latency_ms']:.3f} ms "
                    f"(slowest rank {summary['slowest_rank']}), {summary['qps']:.1f} im/s")
            for r in [summary] + rows:
                record(out_dir, stem, r)
    return complete


def _run_one(engine, mode, cfg, target, dtype, source, batch, make_runner, log, timing_kwargs, group) -> dict:
    """This process's row for global `batch`. In a group, every rank makes the same collective
    calls in the same order whether or not it runs out of memory (engine/distributed.py)."""
    if target.is_gpu:  # free the previous size's engine before building this one
        gc.collect()
        torch.cuda.empty_cache()
    local = group.local_batch(batch)
    row = {"batch_size": batch, "mode": mode, "engine": engine, "devices": group.world_size,
           "model": cfg.model_name, "variant": cfg.variant}
    what = f"{engine} {mode} batch {batch}"
    if group.enabled:
        row.update(rank=group.rank, local_batch_size=local)
        what += f" rank {group.rank} (local batch {local})"
    agreed = []

    def coordinate(iters):
        agreed.append(iters)
        return group.agree(iters)

    fn = info = None
    try:
        try:
            fn, info = make_runner(local)
        except Exception as err:
            if not is_oom(err):
                raise
            fn = None
        if not group.all_ok(fn is not None):
            raise PeerFailed("some rank could not build its runner")
        if target.is_gpu:  # peak memory of serving, not of compiling or autotuning
            torch.cuda.synchronize()
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            timing = measure(fn, target.device, coordinate=coordinate if group.enabled else None, **timing_kwargs)
        except Exception as err:
            if not is_oom(err):
                raise
            if group.enabled and not agreed:
                group.agree(FAILED, check=False)  # keep the others' collectives in step
            raise torch.cuda.OutOfMemoryError(str(err)) from err
        row.update(latency_ms=timing.median_ms, qps=local * 1e3 / timing.median_ms, timing=timing.as_dict(),
                   **info)
        if target.is_gpu:
            # reserved, not allocated: a CUDA graph's activations live in its private pool, which
            # counts as reserved but not allocated between replays
            row["peak_mem_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
            row["peak_alloc_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        log(f"{what}: {timing}, {row['qps']:.1f} im/s")
    except (torch.cuda.OutOfMemoryError, PeerFailed) as err:
        row.update(latency_ms="OOM", qps=None)
        where = ""
        if group.enabled and isinstance(err, PeerFailed) and fn is not None:
            where = " on another rank"
            row["skipped"] = "another rank ran out of memory"
        log(f"{what}: out of GPU memory{where}; row marked OOM, going on")
    finally:
        fn = info = None
    row["environment"] = environment(target, dtype, source)
    row["gflop"] = round(cfg.flops(local) / 1e9, 1)
    return row


def aggregate(rows: List[dict], cfg) -> dict:
    """The row of a data-parallel run from its per-rank rows: latency = the slowest rank's median
    (the global batch is done when the last device is), QPS = global batch / that latency."""
    first = rows[0]
    batch, world = first["batch_size"], len(rows)
    summary = {k: v for k, v in first.items() if k not in ("rank", "timing", "peak_mem_mb", "environment", "skipped")}
    summary.update(devices=world, local_batch_size=batch // world, gflop=round(cfg.flops(batch) / 1e9, 1))
    summary["environment"] = dict(first["environment"], rank_gpus=[r["environment"].get("gpu") for r in rows],
                                  hosts=sorted({r["environment"].get("host") for r in rows}))
    if any(r["latency_ms"] == "OOM" for r in rows):
        summary.update(latency_ms="OOM", qps=None,
                       oom_ranks=[r["rank"] for r in rows if r["latency_ms"] == "OOM" and "skipped" not in r])
        return summary
    slowest = max(rows, key=lambda r: r["latency_ms"])
    summary.update(latency_ms=slowest["latency_ms"], qps=batch * 1e3 / slowest["latency_ms"],
                   timing=slowest["timing"], slowest_rank=slowest["rank"],
                   rank_latency_ms=[r["latency_ms"] for r in rows])
    mems = [r["peak_mem_mb"] for r in rows if "peak_mem_mb" in r]
    if mems:
        summary["peak_mem_mb"] = max(mems)
    return summary
