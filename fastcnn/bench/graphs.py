"""CUDA graphs for the benchmarks: a call captured once and replayed, so that a run
measures the GPU's work without the host's per-op cost (Python, dispatch, launches).
The first H100 runs found that cost setting the time of every small layer and of
the small networks; a graph replay shows what the kernels alone would give."""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_CALLS = 3


def capture(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """A callable that replays one call of fn as a CUDA graph and returns the output of
    the captured call (the same tensors, refilled by every replay). fn must read only
    tensors that outlive the graph (its inputs are the graph's static inputs). It runs
    WARMUP_CALLS times on a side stream first, as torch.cuda.graph asks, so that lazy
    work (Triton compiles, config choice, cuBLAS handles) happens outside the capture."""
    if device.type != "cuda":
        raise ValueError(f"CUDA graphs need a CUDA device, got {device}")
    with torch.cuda.device(device):  # the graph records on the current device's stream
        return _capture_current(fn, device)


def _capture_current(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(WARMUP_CALLS):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    replay.graph = graph  # kept alive with the callable
    return replay
