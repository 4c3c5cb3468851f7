"""Shared set-up for the pytest-benchmark suites (`pytest benches/ --benchmark-only`).

Each suite puts eager PyTorch, torch.compile of the same eager code, and every
fastcnn backend that can be timed here in one group, so pytest-benchmark shows
them side by side. GPU calls are synchronised inside the timed function."""

import pytest
import torch

import fastcnn
from fastcnn.bench.runner import benchmark_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32
BACKENDS = benchmark_backends(DEVICE)
# The GPU gets a larger batch so that each op moves far more than the L2 cache holds.
BATCH = 64 if DEVICE.type == "cuda" else 8


def synchronised(fn):
    """fn followed by a device sync, so that the benchmark times the kernel, not its launch."""
    if DEVICE.type != "cuda":
        return fn

    def run(*args):
        out = fn(*args)
        torch.cuda.synchronize()
        return out

    return run


def activation(shape, channels_last=False, dtype=DTYPE):
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.fixture(params=["eager", "compile", *BACKENDS])
def implementation(request):
    """'eager', 'compile' or a fastcnn backend name; a fastcnn backend is selected for the test."""
    if request.param in BACKENDS:
        with fastcnn.use_backend(request.param):
            yield request.param
    else:
        yield request.param


def pick(implementation, eager_fn, fastcnn_fn):
    """The callable to time for this implementation, warmed up (compiled) once."""
    if implementation == "eager":
        return synchronised(eager_fn)
    if implementation == "compile":
        return synchronised(torch.compile(eager_fn))
    return synchronised(fastcnn_fn)


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def on_device(layer):
    """The layer at the batch it is benchmarked with here (batch 32 on a GPU)."""
    from fastcnn.bench.layers import on_device as at_batch_for
    return at_batch_for(layer, DEVICE)


def run_layer_case(benchmark, implementation, case):
    benchmark.group = f"{case.op} {case.label}"
    torch.manual_seed(0)
    inputs = case.make_inputs(case.shape, DTYPE, DEVICE, case.channels_last)
    with torch.enable_grad() if case.needs_grad else torch.no_grad():
        fn = pick(implementation, case.eager, case.fastcnn)
        rounds = 3 if case.flops > 2e10 else 10
        got = benchmark.pedantic(fn, args=inputs, rounds=rounds, warmup_rounds=1).detach().clone()
        benchmark.extra_info["gflop"] = case.flops / 1e9
        expected = case.eager(*inputs).detach()
    scale = max(1.0, float(expected.float().abs().max()))
    tol = 1e-4 if DTYPE == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol * scale)
