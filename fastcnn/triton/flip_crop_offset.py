"""Triton kernel for the fused augmentation: crop + horizontal mirror + per-image,
per-channel offset, in one read and one write of the batch.

out[n, c, y, x] = src[n, c, top[n] - pad + y, left[n] - pad + x'] + offset[n, c],
x' = w - 1 - x if flip[n] else x; source pixels outside the image read as 0 (the
crop's zero padding)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcnn.triton.common import acc_dtype, cdiv, launchable

BLOCK = 1024


@triton.jit
def round_to_bfloat16(v):
    """float32 -> the nearest bfloat16 (ties to even), still as float32. The
    interpreter's float32 -> bfloat16 cast truncates; after this, every cast is exact
    and both agree with torch's rounding."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def flip_crop_offset_kernel(src_ptr, out_ptr, top_ptr, left_ptr, flip_ptr, offset_ptr,
                            C, H, W, h, w, pad,
                            s_n, s_c, s_h, s_w, o_n, o_c, o_h, o_w,
                            ACC: tl.constexpr, BF16_OUT: tl.constexpr, BLOCK: tl.constexpr):
    plane = tl.program_id(0)  # n * C + c
    n = plane // C
    c = plane % C
    top = tl.load(top_ptr + n) - pad
    left = tl.load(left_ptr + n) - pad
    flip = tl.load(flip_ptr + n)
    offset = tl.load(offset_ptr + plane).to(ACC)

    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < h * w
    y = offs // w
    x = offs % w
    sy = y + top
    sx = tl.where(flip != 0, w - 1 - x, x) + left
    inside = mask & (sy >= 0) & (sy < H) & (sx >= 0) & (sx < W)
    src = src_ptr + n.to(tl.int64) * s_n + c.to(tl.int64) * s_c + sy * s_h + sx * s_w
    v = tl.load(src, mask=inside, other=0.0).to(ACC)
    dst = out_ptr + n.to(tl.int64) * o_n + c.to(tl.int64) * o_c + y * o_h + x * o_w
    v = v + offset
    if BF16_OUT:
        v = round_to_bfloat16(v)
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=mask)


def flip_crop_offset(images: torch.Tensor, out: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                     flip: torch.Tensor, offset: torch.Tensor, padding: int) -> None:
    """top, left, flip: (N,) int32 on the images' device; offset: (N, C) contiguous, in
    the accumulation dtype (float64 for float64 images, else float32)."""
    n, c, hi, wi = images.shape
    h, w = out.shape[-2:]
    grid = (n * c, cdiv(h * w, BLOCK))
    launchable(flip_crop_offset_kernel)[grid](images, out, top, left, flip, offset, c, hi, wi, h, w, padding,
                                              *images.stride(), *out.stride(), ACC=acc_dtype(images.dtype),
                                              BF16_OUT=out.dtype == torch.bfloat16, BLOCK=BLOCK)
