"""One timing harness for every benchmark: warm up, then time each call with device events
(host clock on the CPU), and report the median and the spread."""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    min_ms: float
    iters: int

    def as_dict(self):
        return asdict(self)

    def __str__(self):
        return f"{self.median_ms:.3f} ms (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f}, n={self.iters})"


def _quantile(sorted_values, q):
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def measure(fn: Callable[[], object], device: torch.device, warmup_s: float = 0.5, min_iters: int = 20,
            max_iters: int = 1000, budget_s: float = 2.0,
            coordinate: Optional[Callable[[int], int]] = None) -> Timing:
    """Time `fn` repeatedly: first warm up for `warmup_s`, then at least `min_iters` calls and as
    many as fit in `budget_s` (at most `max_iters`).

    `coordinate(iters) -> iters`, when given, is called just before the timed loop: several
    processes timed together use it to wait for each other and agree on one iteration count
    (engine/distributed.py)."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    end = time.perf_counter() + warmup_s
    fn()
    sync()
    while time.perf_counter() < end:
        fn()
        sync()
    # estimate one call to size the timed loop
    t0 = time.perf_counter()
    fn()
    sync()
    one = max(time.perf_counter() - t0, 1e-6)
    iters = int(min(max_iters, max(min_iters, budget_s / one)))
    if coordinate is not None:
        iters = coordinate(iters)
    times = []
    if cuda:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.1), _quantile(times, 0.9), times[0], iters)
