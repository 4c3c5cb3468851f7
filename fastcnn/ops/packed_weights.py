"""Convolution weights packed once for the CPU kernel, kept while they stay the same.

The CPU forward conv packs its weight into the micro-kernel's panel layout on every
call. At batch 1 that is a large share of a deep layer's time: a 512->512 3x3
weight is 9.4 MB, and that layer's GEMM at 7x7 takes about as long as packing it.
Calls that ask for it (fastcnn.functional.conv2d(..., pack_weight=True): the convs
of a fused model, at inference) keep the packed copy, checked on every call
against the weight's data pointer and version counter, so an in-place update
(torch.no_grad() copy_, an optimizer step, load_state_dict) or a new storage packs
again. A change the version counter does not see (writing through `.data` or a
NumPy view) is not seen here either, and weights made under torch.inference_mode
(no version counter) are packed in each call. The copy lives as long as the weight tensor
and costs as much memory again as the conv weights.
"""

from __future__ import annotations

import weakref

import torch

from fastcnn import _native

_PACKED: dict[int, tuple[tuple, torch.Tensor]] = {}


def packed_conv_weight(weight: torch.Tensor, weight_stride: tuple, geometry: list[int],
                       dtype_code: int) -> torch.Tensor | None:
    """`weight` packed for the CPU forward conv with this geometry (bytes), packing it if
    it is new or has changed; None where that conv packs nothing (depthwise). The
    caller holds the result while its kernel runs: another thread may replace the
    cached copy meanwhile (kernels run without the GIL). Inference tensors (made
    under torch.inference_mode) have no version counter: they are packed in the call."""
    if weight.is_inference():
        return None
    key = (weight.data_ptr(), weight._version, weight_stride, geometry[-1], dtype_code)  # [-1]: groups
    entry = _PACKED.get(id(weight))
    if entry is not None and entry[0] == key:
        return entry[1]
    module = _native.load("_cpu")
    nbytes = module.conv2d_packed_weight_bytes(geometry, dtype_code)
    if nbytes == 0:
        return None
    packed = torch.empty(nbytes, dtype=torch.uint8)
    module.conv2d_pack_weight(weight.data_ptr(), list(weight_stride), geometry, dtype_code, packed.data_ptr())
    if entry is None:  # first time for this tensor: forget the copy when it dies
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    _PACKED[id(weight)] = (key, packed)
    return packed


def packed_bytes() -> int:
    """Memory held by packed weights now."""
    return sum(packed.numel() for _, packed in _PACKED.values())
