"""The dtype the ops accumulate in: float64 for float64 tensors, float32 for the
others (float16 and bfloat16 sum in float32, as PyTorch's CPU and GPU kernels do)."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
