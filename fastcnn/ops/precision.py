"""The dtype the ops accumulate in: float64 for float64 tensors, float32 for the
others (float16 and bfloat16 sum in float32, as PyTorch's CPU and GPU kernels do)."""

from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tf32_from(*settings) -> bool | None:
    """TF32 allowed by the first of these fp32_precision settings that is not "none"
    (each inherits from the next); None where this torch has no such settings."""
    for setting in settings:
        if setting is None:
            return None
        precision = getattr(setting, "fp32_precision", None)
        if precision is None:
            return None
        if precision != "none":
            return precision == "tf32"
    return False


def conv_allows_tf32() -> bool:
    """Whether float32 convolutions may use TF32, as torch's cuDNN ones decide. Read
    through the fp32_precision settings: once a user has set those, the legacy
    torch.backends.cudnn.allow_tf32 getter raises instead of answering."""
    b = torch.backends
    allowed = _tf32_from(getattr(b.cudnn, "conv", None), b.cudnn, b)
    return torch.backends.cudnn.allow_tf32 if allowed is None else allowed


def _never() -> bool:
    return False


def tf32_reader(dtype: torch.dtype, allows):
    """What a prepared launch calls for its allow_tf32 argument: `allows` (one of the two
    functions here) for float32 tensors, a constant False for the others, whose
    products never use TF32 (reading the flags costs a few us a call)."""
    return allows if dtype == torch.float32 else _never


def matmul_allows_tf32() -> bool:
    """Whether float32 matrix products may use TF32, as torch's cuBLAS ones decide."""
    b = torch.backends
    allowed = _tf32_from(b.cuda.matmul, b)
    return torch.backends.cuda.matmul.allow_tf32 if allowed is None else allowed
