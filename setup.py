"""Builds fastcnn._cpu (C++/OpenMP) and, where nvcc is found, fastcnn._cuda.

Neither module includes torch headers: they take raw pointers from Python, so
the build needs only setuptools, pybind11 and a compiler, and one build serves
every torch version.

FASTCNN_CUDA=0 skips the CUDA module, FASTCNN_CUDA=1 makes a missing nvcc an error;
unset, the module is built whenever nvcc is found. FASTCNN_CPU=0 skips the CPU module
(a quick build on a GPU machine that runs only the GPU backends).
"""

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

ROOT = Path(__file__).parent.resolve()
INCLUDE = "kernels/include"
# Real code for the two GPU generations the project targets, plus PTX so that
# newer GPUs can JIT it.
CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]

ParallelCompile("FASTCNN_BUILD_JOBS", default=0).install()


def sources(folder: str, pattern: str) -> list[str]:
    pattern = pattern if "*" in pattern else f"*{pattern}"
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / folder).glob(pattern))


def kernel_headers() -> list[str]:
    """Every header under kernels/ (.h and .cuh): a change to one rebuilds what includes it."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "kernels").rglob("*.h*"))


def find_nvcc() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
        candidate = Path(cuda_home) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.exists() else None
    return nvcc


def cuda_home_of(nvcc: str) -> Path:
    """The toolkit folder: CUDA_HOME if set, else the one nvcc lives in (through wrappers)."""
    for candidate in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                      str(Path(nvcc).resolve().parent.parent), "/usr/local/cuda"):
        if candidate and (Path(candidate) / "include" / "cuda_runtime.h").exists():
            return Path(candidate)
    raise RuntimeError(f"found {nvcc} but no CUDA headers beside it; set CUDA_HOME")


def cuda_wanted() -> str | None:
    """Path of nvcc if the CUDA module is to be built, else None."""
    setting = os.environ.get("FASTCNN_CUDA", "")
    if setting == "0":
        return None
    nvcc = find_nvcc()
    if nvcc is None and setting == "1":
        raise RuntimeError("FASTCNN_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return nvcc


class BuildExt(build_ext):
    """Compiles the .cu sources with nvcc before linking fastcnn._cuda."""

    def build_extension(self, ext):
        if ext.name == "fastcnn._cuda":
            self._compile_cuda_objects(ext)
        super().build_extension(ext)

    def _compile_cuda_objects(self, ext):
        nvcc = ext.nvcc
        obj_dir = Path(self.build_temp) / "cuda"
        obj_dir.mkdir(parents=True, exist_ok=True)
        newest_header = max((Path(h).stat().st_mtime for h in kernel_headers()), default=0)
        commands = []
        for src in ext.cuda_sources:
            obj = obj_dir / (Path(src).stem + ".o")
            src_time = max((ROOT / src).stat().st_mtime, newest_header)
            if not obj.exists() or obj.stat().st_mtime < src_time:
                # --threads: the three code targets of one file compile side by side.
                commands.append([nvcc, "-c", str(ROOT / src), "-o", str(obj), "-O3", "-std=c++17",
                                 "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "--threads", "3",
                                 f"-I{ROOT / INCLUDE}", *CUDA_ARCH_FLAGS])
            ext.extra_objects.append(str(obj))
        # Files side by side too: the implicit-GEMM files take most of a minute each.
        jobs = int(os.environ.get("FASTCNN_BUILD_JOBS") or 0) or os.cpu_count() or 1
        with ThreadPoolExecutor(max_workers=max(1, min(jobs, len(commands) or 1))) as pool:
            for cmd in commands:
                print(" ".join(cmd), flush=True)
            list(pool.map(subprocess.check_call, commands))


def extensions():
    cpu = Pybind11Extension(
        "fastcnn._cpu",
        sources=[*sources("kernels/bindings", "cpu_*.cpp"), *sources("kernels/cpu", ".cpp")],
        include_dirs=[INCLUDE],
        extra_compile_args=["-O3", "-fopenmp", "-fno-math-errno"],
        extra_link_args=["-fopenmp"],
        depends=kernel_headers(),
        cxx_std=17,
    )
    exts = [] if os.environ.get("FASTCNN_CPU", "") == "0" else [cpu]
    nvcc = cuda_wanted()
    if nvcc is not None:
        cuda_home = cuda_home_of(nvcc)
        lib_dir = next((d for d in (cuda_home / "lib64", cuda_home / "lib") if d.exists()),
                       cuda_home / "lib64")
        cuda = Pybind11Extension(
            "fastcnn._cuda",
            sources=sources("kernels/bindings", "cuda_*.cpp"),
            include_dirs=[INCLUDE, str(cuda_home / "include")],
            # The static runtime lets the module import where no CUDA toolkit is installed.
            extra_objects=[str(lib_dir / "libcudart_static.a")],
            libraries=["rt", "pthread", "dl"],
            extra_compile_args=["-O2"],
            cxx_std=17,
        )
        cuda.nvcc = nvcc
        cuda.cuda_sources = sources("kernels/cuda", ".cu")
        # Relink when a .cu or a header changes, not only when a binding does.
        cuda.depends = [*cuda.cuda_sources, *kernel_headers()]
        exts.append(cuda)
    return exts


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
