"""fastcnn::flip_crop_offset: the fused augmentation step (fastcnn.data.FusedAugment)
as a torch.library op,

    out[n, c, y, x] = padded[n, c, top[n] + y, left[n] + x'] + offset[n, c],
    x' = w - 1 - x where flip[n], else x,

with `padded` the images with `padding` zeros around them. Two implementations,
chosen by the `backend` argument (fastcnn.data.flip_crop_offset picks it): "torch"
(a gather + add in PyTorch ops, any device) and "triton" (one kernel: one read and
one write of the batch). Both compute in float32 (float64 for float64 images) and
give the same bits. The caller (fastcnn.data.flip_crop_offset) checks the arguments
and hands over top/left as int64, flip as bool and offset contiguous in the
accumulation dtype, all on the images' device. Data augmentation has no gradient:
the op has no autograd formula, so images that require grad are refused.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastcnn.ops.launch import backend_table
from fastcnn.ops.triton_route import route_to_triton_when_compiled
from fastcnn.ops.precision import acc_dtype

SCHEMA = ("(Tensor images, SymInt[2] size, Tensor top, Tensor left, Tensor flip, Tensor offset, int padding, "
          "str backend) -> Tensor")



def memory_format(images: Tensor) -> torch.memory_format:
    """channels_last out for channels_last images (not for ones that are both)."""
    channels_last = images.is_contiguous(memory_format=torch.channels_last) and not images.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _new_output(images: Tensor, size) -> Tensor:
    n, c = images.shape[:2]
    return torch.empty((n, c, size[0], size[1]), dtype=images.dtype, device=images.device,
                       memory_format=memory_format(images))


def _torch_flip_crop_offset(images, out, top, left, flip, offset, padding) -> None:
    n, c, hi, wi = images.shape
    h, w = out.shape[-2:]
    device = images.device
    xs = torch.arange(w, device=device)
    rows = top.view(n, 1) - padding + torch.arange(h, device=device)
    cols = left.view(n, 1) - padding + torch.where(flip.view(n, 1), w - 1 - xs, xs)
    inside = (((rows >= 0) & (rows < hi)).view(n, 1, h, 1) & ((cols >= 0) & (cols < wi)).view(n, 1, 1, w))
    picked = images.gather(2, rows.clamp(0, hi - 1).view(n, 1, h, 1).expand(n, c, h, wi))
    picked = picked.gather(3, cols.clamp(0, wi - 1).view(n, 1, 1, w).expand(n, c, h, w))
    acc = acc_dtype(images.dtype)
    picked = torch.where(inside, picked.to(acc), torch.zeros((), dtype=acc, device=device))
    out.copy_(picked + offset.view(n, c, 1, 1))


def _triton_flip_crop_offset(images, out, top, left, flip, offset, padding) -> None:
    from fastcnn.triton import flip_crop_offset as kernels
    kernels.flip_crop_offset(images, out, top.to(torch.int32), left.to(torch.int32), flip.to(torch.int32), offset,
                             padding)


LAUNCH = backend_table(torch=_torch_flip_crop_offset, triton=_triton_flip_crop_offset)  # no C++ implementation


def _run(launch, images, size, top, left, flip, offset, padding) -> Tensor:
    out = _new_output(images, size)
    if out.numel():
        launch(images, out, top, left, flip, offset, padding)
    return out


@torch.library.custom_op("fastcnn::flip_crop_offset", mutates_args=(), schema=SCHEMA)
def flip_crop_offset(images, size, top, left, flip, offset, padding, backend):
    return _run(LAUNCH[backend], images, size, top, left, flip, offset, padding)


@flip_crop_offset.register_fake
def _(images, size, top, left, flip, offset, padding, backend):
    return _new_output(images, size)


@torch.library.triton_op("fastcnn::flip_crop_offset_triton", mutates_args=())
def flip_crop_offset_triton(images: Tensor, size: list[int], top: Tensor, left: Tensor, flip: Tensor, offset: Tensor,
                            padding: int, backend: str) -> Tensor:
    launch = _triton_flip_crop_offset if backend == "triton" else _torch_flip_crop_offset
    return _run(launch, images, size, top, left, flip, offset, padding)


route_to_triton_when_compiled(flip_crop_offset, flip_crop_offset_triton)
