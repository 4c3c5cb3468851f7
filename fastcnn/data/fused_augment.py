"""Crop, mirror, colour shift and PCA colour in one pass over the batch.

The four steps only move pixels within a row (crop, mirror) and add a constant per
image and channel (colour shift, PCA colour), so they fold into one gather + add:

    out[n, c, y, x] = padded[n, c, top[n] + y, left[n] + x'] + offset[n, c]

with x' = w - 1 - x for mirrored images, and offset the sum of the colour shift and
the PCA term, computed on the host: the op fastcnn::flip_crop_offset
(fastcnn/ops/flip_crop_offset.py). On CUDA it runs as one Triton kernel (one read
and one write of the batch); elsewhere as the same gather + add in torch ops. Both
compute in float32 (float64 for float64 images) and give the same bits.

`FusedAugment(crop, mirror, color, pca)` takes the separate transforms (any may be
None), draws their parameters with their own generators in that order, so it gives
the same batch as `Compose([crop, mirror, color, pca])` of equally seeded
transforms, up to the rounding of adding the two offsets at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

import fastcnn.ops  # noqa: F401  (registers torch.ops.fastcnn.flip_crop_offset)
from fastcnn import backends
from fastcnn.data.augment import (ColorShift, Compose, Params, PCAColor, RandomCrop, RandomMirror, check_images,
                                  sample_and_apply)
from fastcnn.ops.precision import acc_dtype

__all__ = ["FusedAugment", "flip_crop_offset"]

FUSED_BACKENDS = ("torch", "triton")


def flip_crop_offset(images: Tensor, size: Sequence[int], top: Tensor, left: Tensor, flip: Tensor,
                     offset: Tensor, padding: int = 0, backend: str | None = None) -> Tensor:
    """The fused transform with given parameters.

    images (N, C, H, W) float; size (h, w) of the output; top, left (N,) ints: the
    crop's corner in the image padded by `padding`; flip (N,) bool; offset (N, C).
    backend: "triton", "torch" or None (Triton on CUDA when available, else torch).
    Returns a new (N, C, h, w) tensor in the images' memory format.
    """
    check_images(images)
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, hi, wi = images.shape
    h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1 or h > hi + 2 * padding or w > wi + 2 * padding:
        raise ValueError(f"size ({h}, {w}) must be positive and fit in the padded image "
                         f"({hi + 2 * padding}, {wi + 2 * padding})")
    for name, t in (("top", top), ("left", left), ("flip", flip)):
        if not isinstance(t, Tensor) or t.shape != (n,):
            raise ValueError(f"{name} must be a tensor of shape ({n},), got {getattr(t, 'shape', t)}")
    if not isinstance(offset, Tensor) or offset.shape != (n, c):
        raise ValueError(f"offset must be a tensor of shape ({n}, {c}), got {getattr(offset, 'shape', offset)}")
    if backend is None:
        backend = "triton" if images.is_cuda and backends.why_unavailable("triton", "cuda") is None else "torch"
    if backend not in FUSED_BACKENDS:
        raise ValueError(f"backend must be one of {FUSED_BACKENDS} or None, got {backend!r}")
    if backend == "triton" and (reason := backends.why_unavailable("triton", images.device.type)):
        raise RuntimeError(f"backend 'triton' cannot run here: {reason}")

    # Checked where it costs no device sync and no graph break (torch.compile); the
    # kernels mask their reads either way.
    if n and not top.is_cuda and not left.is_cuda and not torch.compiler.is_compiling() and (
            top.min() < 0 or top.max() > hi + 2 * padding - h or left.min() < 0 or left.max() > wi + 2 * padding - w):
        raise ValueError("top and left must place the crop inside the padded image")
    if torch.is_grad_enabled() and images.requires_grad:
        raise ValueError("images must not require grad: data augmentation has no gradient (detach them first)")
    device = images.device
    top, left = top.to(device, torch.int64), left.to(device, torch.int64)
    flip = flip.to(device, torch.bool)
    offset = offset.to(device, acc_dtype(images.dtype)).contiguous()
    return torch.ops.fastcnn.flip_crop_offset(images, [h, w], top, left, flip, offset, padding, backend)


class FusedAugment:
    """Crop, then mirror, then colour shift, then PCA colour, in one pass.

    crop: RandomCrop or None (keep the size); mirror: RandomMirror or None;
    color: ColorShift or None; pca: PCAColor or None. backend as in flip_crop_offset.
    """

    def __init__(self, crop: RandomCrop | None = None, mirror: RandomMirror | None = None,
                 color: ColorShift | None = None, pca: PCAColor | None = None, backend: str | None = None):
        for name, value, kind in (("crop", crop, RandomCrop), ("mirror", mirror, RandomMirror),
                                  ("color", color, ColorShift), ("pca", pca, PCAColor)):
            if value is not None and not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__} or None, got {type(value).__name__}")
        if backend is not None and backend not in FUSED_BACKENDS:
            raise ValueError(f"backend must be one of {FUSED_BACKENDS} or None, got {backend!r}")
        self.crop, self.mirror, self.color, self.pca = crop, mirror, color, pca
        self.backend = backend

    def _steps(self):
        return [(k, t) for k, t in (("crop", self.crop), ("mirror", self.mirror), ("color", self.color),
                                    ("pca", self.pca)) if t is not None]

    def separate(self) -> Compose:
        """The same transforms, one after another (and sharing their generators)."""
        return Compose([t for _, t in self._steps()])

    def sample(self, shape: Sequence[int]) -> dict[str, Params]:
        """Each step's parameters, drawn in order, keyed by step name."""
        params, shape = {}, list(shape)
        for name, t in self._steps():
            params[name] = t.sample(shape)
            if name == "crop":
                shape[-2:] = t.size
        return params

    def apply_separately(self, images: Tensor, params: dict[str, Params]) -> Tensor:
        """The unfused reference: each step's apply with the given parameters."""
        for name, t in self._steps():
            images = t.apply(images, params[name])
        return images

    def apply(self, images: Tensor, params: dict[str, Params]) -> Tensor:
        n, c, hi, wi = images.shape
        if self.crop is not None:
            size, padding = self.crop.size, self.crop.padding
            top, left = params["crop"]["top"], params["crop"]["left"]
        else:
            size, padding = (hi, wi), 0
            top = left = torch.zeros(n, dtype=torch.int64)
        flip = params["mirror"]["flip"] if self.mirror is not None else torch.zeros(n, dtype=torch.bool)
        offset = torch.zeros(n, c, dtype=torch.float64)
        for name in ("color", "pca"):
            if name in params:
                offset = offset + params[name]["offset"].double().cpu()
        return flip_crop_offset(images, size, top, left, flip, offset, padding, backend=self.backend)

    def __call__(self, images: Tensor) -> Tensor:
        return sample_and_apply(self, images)
