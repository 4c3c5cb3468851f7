"""The CUDA GEMM core on the CPU: tests/host_model/implicit_gemm_host_model.cu runs
kernels/cuda/implicit_gemm.cuh with its conv2d (forward, input and weight gradient)
and linear problems block by block on the host, against float64 loops, for float32,
float64, float16 and bfloat16, odd geometries, both layouts, channel slices,
misaligned 16-byte loads and the split-K sums. Without a GPU this is what checks the
CUDA kernels' index math; races and tensor-core numerics need the GPU's own tests."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="needs nvcc (the host model is CUDA C++ compiled as host code)")
@pytest.mark.heavy
def test_cuda_gemm_core_on_the_cpu(tmp_path):
    program = tmp_path / "implicit_gemm_host_model"
    build = subprocess.run([NVCC, "-std=c++17", "-O1", "--expt-relaxed-constexpr",
                            "-I", str(ROOT / "kernels" / "include"), "-I", str(ROOT / "kernels" / "cuda"),
                            str(ROOT / "tests" / "host_model" / "implicit_gemm_host_model.cu"), "-o", str(program)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(program), "24"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    summaries = [line for line in run.stdout.splitlines() if line.endswith(" 0 failures")]
    assert len(summaries) == 4, run.stdout  # one per dtype
