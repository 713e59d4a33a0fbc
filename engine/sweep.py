"""The benchmark sweep both benchmarks share: for each batch size build a runner, time it with
the one harness, and write a row with the one results writer. A batch size that runs the GPU
out of memory becomes an OOM row and the sweep goes on; the caller learns the sweep was partial."""
from __future__ import annotations

import gc
import sys
from typing import Callable, Iterable, List, Optional

import torch

from .results import environment, record
from .target import Target
from .timing import measure

GPU_SWEEP = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CPU_SWEEP = [1, 2, 4]


def sweep_sizes(target: Target) -> List[int]:
    return list(GPU_SWEEP if target.is_gpu else CPU_SWEEP)


def progress(items, desc: str, enabled: Optional[bool] = None):
    """A progress bar on a terminal, nothing in logs."""
    items = list(items)
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return items
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="batch", file=sys.stderr, leave=False)


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
              log=print, timing_kwargs=None) -> bool:
    """Time `make_runner(batch) -> (fn, info)` at each size; returns True if every size ran."""
    complete = True
    timing_kwargs = timing_kwargs or {}
    for batch in progress(sizes, f"{engine} {mode}"):
        if target.is_gpu:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        row = {"batch_size": batch, "mode": mode, "engine": engine, "devices": 1, "model": cfg.model_name,
               "variant": cfg.variant}
        try:
            fn, info = make_runner(batch)
            if target.is_gpu:  # peak memory of serving, not of compiling or autotuning
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            timing = measure(fn, target.device, **timing_kwargs)
            row.update(latency_ms=timing.median_ms, qps=batch * 1e3 / timing.median_ms, timing=timing.as_dict(),
                       **info)
            if target.is_gpu:
                row["peak_mem_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            log(f"{engine} {mode} batch {batch}: {timing}, {row['qps']:.1f} im/s")
        except Exception as err:
            if not is_oom(err):
                raise
            complete = False
            row.update(latency_ms="OOM", qps=None)
            log(f"{engine} {mode} batch {batch}: out of GPU memory; row marked OOM, going on")
        finally:
            fn = info = None
        row["environment"] = environment(target, dtype, source)
        row["gflop"] = round(cfg.flops(batch) / 1e9, 1)
        record(out_dir, stem, row)
    return complete
