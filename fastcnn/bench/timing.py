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


def time_ms_interleaved(fns: dict[str, Callable[[], object]], device: torch.device, *, budget_ms: float = 1000.0,
                        min_repeats: int = 3, max_repeats: int = 200, warmup_rounds: int = 2) -> dict[str, float]:
    """Median milliseconds per call of each callable, sampled in rounds that run each
    once in turn, so that a slow spell of a shared machine (other jobs, a clock
    change) falls on every contender alike instead of on whichever was being timed
    then. About budget_ms per contender; on a GPU each sample times a batch of calls
    between CUDA events, as time_ms does. `warmup_rounds` untimed interleaved rounds
    come first: with several large models in memory the first few calls of one of
    them can run 2x slow while the others settle (AlexNet's training step at batch 1
    on the 2-core CPU: its 3rd to 5th interleaved steps), and where only 5 rounds fit
    the budget that decided the median."""
    first = {name: time_ms(fn, device, warmup=1, repeats=1) for name, fn in fns.items()}
    round_ms = sum(first.values())
    repeats = int(min(max_repeats, max(min_repeats, budget_ms * len(fns) / max(round_ms, 1e-3))))
    for _ in range(warmup_rounds):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    if device.type == "cuda":
        calls = {name: _calls_per_sample_cuda(fn, device, 1.0) for name, fn in fns.items()}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(calls[name]):
                    fn()
                end.record()
                end.synchronize()
                samples[name].append(start.elapsed_time(end) / calls[name])
            else:
                t0 = time.perf_counter()
                fn()
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: statistics.median(values) for name, values in samples.items()}


def _calls_per_sample_cuda(fn, device, min_run_ms: float) -> int:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    return max(1, min(1000, int(min_run_ms / once)))
