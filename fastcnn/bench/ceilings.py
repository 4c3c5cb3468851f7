"""This machine's measured ceilings: copy bandwidth and matrix-product rate.

Achieved GB/s and TFLOP/s are reported as fractions of these, measured in the
same run as the kernels they judge."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastcnn.bench.timing import time_ms


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float  # bytes read + bytes written per second, in GB/s
    matmul_tflops: float
    matmul_dtype: str


def measure(device: torch.device, *, quick: bool = False, dtype: torch.dtype | None = None) -> Ceilings:
    """Copy bandwidth, and the matrix-product rate in `dtype` (default: float16 on a
    GPU, float32 on the CPU), the dtype the compute-bound ops are judged in."""
    # A copy far larger than the last-level cache, so that DRAM/HBM is what is measured.
    numel = (64 if quick else 256) * 2**20 // 4 * (4 if device.type == "cuda" else 1)
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats=5 if quick else 11)
    copy_gbps = 2 * src.numel() * src.element_size() / ms / 1e6

    if device.type == "cuda":
        n, dtype = (4096 if quick else 8192), dtype or torch.float16
    else:
        n, dtype = (1024 if quick else 2048), dtype or torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = time_ms(lambda: torch.mm(a, b), device, repeats=5 if quick else 9)
    return Ceilings(copy_gbps=copy_gbps, matmul_tflops=2 * n**3 / ms / 1e9, matmul_dtype=str(dtype).removeprefix("torch."))
