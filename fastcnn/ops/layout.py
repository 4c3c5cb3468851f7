"""Memory layouts: outputs follow their input's layout (NCHW in, NCHW out;
channels_last in, channels_last out), as in PyTorch.

Real and fake implementations allocate through the same functions here, so the
fake tensors' strides always equal the real ones.
"""

from __future__ import annotations

import torch


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D tensor whose channels vary fastest, else contiguous."""
    if t.dim() != 4 or t.is_contiguous():
        return torch.contiguous_format
    if t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    # Not dense (a slice, say): keep the order of its strides, as torch.empty_like does.
    return torch.channels_last if t.stride(1) < t.stride(3) else torch.contiguous_format


def new_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """An uninitialised tensor in t's layout, with t's shape unless given."""
    shape = tuple(t.shape) if shape is None else tuple(shape)
    fmt = memory_format_of(t) if len(shape) == 4 else torch.contiguous_format
    return torch.empty(shape, dtype=dtype or t.dtype, device=t.device, memory_format=fmt)


def dense_in(t: torch.Tensor, fmt: torch.memory_format) -> torch.Tensor:
    """t itself if it is already dense in fmt, else a dense copy: flat kernels need that."""
    if t.dim() != 4:
        fmt = torch.contiguous_format
    return t if t.is_contiguous(memory_format=fmt) else t.contiguous(memory_format=fmt)
