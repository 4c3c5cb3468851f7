"""Timing a callable: medians of many runs, with GPU work synchronised properly."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, repeats: int = 15,
            min_run_ms: float = 1.0) -> float:
    """Median milliseconds per call. On a GPU each sample times a batch of calls
    between CUDA events (per-call syncs would inflate microsecond kernels)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        calls = _calls_per_sample_cuda(fn, device, min_run_ms)
        samples = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / calls)
        return statistics.median(samples)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _calls_per_sample_cuda(fn, device, min_run_ms: float) -> int:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    return max(1, min(1000, int(min_run_ms / once)))
