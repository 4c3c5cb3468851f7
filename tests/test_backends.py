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
    assert cpu.max_threads() >= 1


def test_cpu_base_variant_matches(tmp_path):
    """FASTCNN_CPU_ISA=base runs the plain x86-64 variant (what a CPU without AVX2
    gets): it must import, run and give the same results."""
    script = (
        "import torch, fastcnn, fastcnn._cpu as c\n"
        "from fastcnn import functional as F\n"
        "assert not c.has_avx2()\n"
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
    env = dict(os.environ, FASTCNN_CPU_ISA="base")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


@pytest.mark.skipif(shutil.which("nvcc") is None or os.environ.get("FASTCNN_CUDA") == "0",
                    reason="fastcnn._cuda is built only where nvcc exists")
def test_cuda_module_was_built_and_imports():
    import fastcnn._cuda as cuda

    assert cuda.runtime_version() > 0
    if not torch.cuda.is_available():
        assert cuda.device_count() == 0
        with pytest.raises(RuntimeError, match="no CUDA device"):
            cuda.add_act(0, 0, 0, 1, 0, 1, 0)
