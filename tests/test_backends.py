"""Backend selection: defaults, use_backend, FASTCNN_BACKEND, clear errors."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastcnn
from fastcnn import backends
from fastcnn import functional as F


def test_available_backends_here():
    names = fastcnn.available_backends("cpu")
    assert "torch" in names and "cpu" in names
    assert "cuda" not in names
    assert set(fastcnn.available_backends()) >= set(names)


def test_default_follows_device():
    assert backends.resolve(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():
        assert backends.resolve(torch.device("cuda")) == "triton"


def test_use_backend_context_and_plain_call():
    with fastcnn.use_backend("torch"):
        assert backends.resolve(torch.device("cpu")) == "torch"
        with fastcnn.use_backend("cpu"):
            assert backends.resolve(torch.device("cpu")) == "cpu"
        assert backends.resolve(torch.device("cpu")) == "torch"
    assert backends.selected_backend() is None
    fastcnn.use_backend("torch")
    try:
        assert backends.resolve(torch.device("cpu")) == "torch"
    finally:
        fastcnn.use_backend(None)
    assert backends.selected_backend() is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("FASTCNN_BACKEND", "torch")
    assert backends.resolve(torch.device("cpu")) == "torch"
    with fastcnn.use_backend("cpu"):  # an explicit choice wins over the environment
        assert backends.resolve(torch.device("cpu")) == "cpu"
    monkeypatch.setenv("FASTCNN_BACKEND", "fortran")
    with pytest.raises(ValueError, match="FASTCNN_BACKEND"):
        backends.resolve(torch.device("cpu"))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        fastcnn.use_backend("opencl")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_backend_that_cannot_run_names_what_is_missing():
    a = torch.randn(2, 3)
    with fastcnn.use_backend("cuda"), pytest.raises(RuntimeError, match="cuda"):
        F.add_act(a, a)


def test_cpu_module_imports_and_dispatches():
    import fastcnn._cpu as cpu

    assert isinstance(cpu.has_avx2(), bool)
    assert isinstance(cpu.has_avx512(), bool)
    assert cpu.has_avx2() or not cpu.has_avx512()
    assert cpu.max_threads() >= 1


def test_cpu_base_variant_matches(tmp_path):
    """FASTCNN_CPU_ISA=base runs the plain x86-64 variant (what a CPU without AVX2
    gets): it must import, run and give the same results."""
    script = (
        "import torch, fastcnn, fastcnn._cpu as c\n"
        "from fastcnn import functional as F\n"
        "assert not c.has_avx2() and not c.has_avx512()\n"
        "a, b = torch.randn(3, 5, 7, 9), torch.randn(3, 5, 7, 9)\n"
        "torch.testing.assert_close(F.add_act(a, b), torch.relu(a + b))\n"
        "w, bias = torch.randn(9, 5, 3, 3), torch.randn(9)\n"
        "x = torch.randn(2, 5, 8, 8).contiguous(memory_format=torch.channels_last)\n"
        "ref = torch.tanh(torch.nn.functional.conv2d(x.double(), w.double(), bias.double(), padding=1)).float()\n"
        "torch.testing.assert_close(F.conv2d(x, w, bias, padding=1, act='tanh'), ref, rtol=1e-5, atol=1e-5)\n"
        "v, m = torch.randn(7, 20), torch.randn(17, 20)\n"
        "torch.testing.assert_close(F.linear(v, m, act='sigmoid'), torch.sigmoid(v @ m.T), rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    env = dict(os.environ, FASTCNN_CPU_ISA="base", FASTCNN_BACKEND="cpu")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


_GEMM_OPS_SCRIPT = """
import os, sys, torch
import fastcnn._cpu as cpu
from fastcnn import functional as F
assert cpu.has_avx512() != (os.environ.get("FASTCNN_CPU_ISA") == "avx2")
torch.manual_seed(0)
x = torch.randn(3, 24, 9, 11, dtype=torch.float64).float().contiguous(memory_format=torch.channels_last)
x.requires_grad_()
w = torch.randn(40, 24, 3, 3, requires_grad=True)
b = torch.randn(40, requires_grad=True)
r = torch.randn(3, 40, 9, 11).contiguous(memory_format=torch.channels_last)
y = F.conv2d(x, w, b, padding=1, residual=r, act="relu")
y.backward(torch.randn_like(y))
v, m = torch.randn(37, 50, requires_grad=True), torch.randn(45, 50, requires_grad=True)
z = F.linear(v, m, act="tanh")
z.backward(torch.randn_like(z))
torch.save([y, x.grad, w.grad, b.grad, z, v.grad, m.grad], sys.argv[1])
"""


def test_cpu_avx512_variant_matches_avx2_bits(tmp_path):
    """Where the CPU has AVX-512, the GEMM's wide micro-kernel sums each element in the
    same order as the AVX2 one: conv and linear, forward and every gradient, give the
    same bits with FASTCNN_CPU_ISA=avx2 (a subprocess) as with AVX-512 (another)."""
    import fastcnn._cpu as cpu

    if not cpu.has_avx512():
        pytest.skip("this CPU has no AVX-512")
    results = {}
    for isa in ("avx2", "default"):
        env = dict(os.environ, FASTCNN_BACKEND="cpu")
        env.pop("FASTCNN_CPU_ISA", None)
        if isa == "avx2":
            env["FASTCNN_CPU_ISA"] = "avx2"
        path = tmp_path / f"{isa}.pt"
        done = subprocess.run([sys.executable, "-c", _GEMM_OPS_SCRIPT, str(path)], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        results[isa] = torch.load(path)
    for narrow, wide in zip(results["avx2"], results["default"]):
        assert torch.equal(narrow, wide)


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("FASTCNN_CUDA") == "0",
                    reason="fastcnn._cuda is built only where nvcc exists")
def test_cuda_module_was_built_and_imports():
    import fastcnn._cuda as cuda

    assert cuda.runtime_version() > 0
    if not torch.cuda.is_available():
        assert cuda.device_count() == 0
        with pytest.raises(RuntimeError, match="no CUDA device"):
            cuda.add_act(0, 0, 0, 1, 0, 1, 0)


def test_cpu_backend_tests_run_on_two_threads(backend_device):
    """Under `pytest -n` a worker may get one OpenMP thread; the cpu backend's tests still
    run the CPU kernels' thread splits (conftest.backend_device)."""
    from conftest import usable_cores
    backend, _ = backend_device
    if backend == "cpu":
        assert torch.get_num_threads() >= min(2, usable_cores())
