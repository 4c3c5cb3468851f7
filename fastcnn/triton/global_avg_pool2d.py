"""Triton kernels for global average pooling (the mean over H and W of each (n, c))
and its backward. Forward sums a [rows, positions] tile per program and reduces it
once at the end, so the order of the additions is fixed by the shape: NCHW tiles
hold planes along the rows; channels_last tiles hold channels along the columns."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcnn.triton.common import acc_dtype, cdiv, launchable, next_power_of_2

BLOCK = 1024


@triton.jit
def global_pool_planes_kernel(in_ptr, out_ptr, planes, C, HW, is0, is1, pos_stride, os0, os1,
                              ACC: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_ok = plane < planes
    n = plane // C
    c = plane % C
    base = n * is0 + c * is1
    acc = tl.zeros([ROWS, BLOCK_P], dtype=ACC)
    for start in range(0, HW, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        ok = row_ok[:, None] & (p < HW)[None, :]
        acc += tl.load(in_ptr + base[:, None] + p[None, :].to(tl.int64) * pos_stride, mask=ok, other=0.0).to(ACC)
    total = tl.sum(acc, axis=1)
    tl.store(out_ptr + n * os0 + c * os1, (total / HW).to(out_ptr.dtype.element_ty), mask=row_ok)


@triton.jit
def global_pool_channels_kernel(in_ptr, out_ptr, C, HW, is0, is1, pos_stride, os0, os1,
                                ACC: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = n * is0 + c.to(tl.int64) * is1
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=ACC)
    for start in range(0, HW, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        ok = (p < HW)[:, None] & c_ok[None, :]
        acc += tl.load(in_ptr + p[:, None].to(tl.int64) * pos_stride + base[None, :], mask=ok, other=0.0).to(ACC)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + n * os0 + c * os1, (total / HW).to(out_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def global_pool_backward_kernel(grad_out_ptr, grad_in_ptr, total, C, H, W, is0, is1, is2, is3, os0, os1,
                                CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    if CHANNELS_LAST:
        c = offs % C
        rest = offs // C
        w = rest % W
        rest = rest // W
        h = rest % H
        n = rest // H
    else:
        w = offs % W
        rest = offs // W
        h = rest % H
        rest = rest // H
        c = rest % C
        n = rest // C
    g = tl.load(grad_out_ptr + n * os0 + c * os1, mask=mask, other=0.0).to(ACC)
    tl.store(grad_in_ptr + n * is0 + c * is1 + h * is2 + w * is3,
             (g / (H * W)).to(grad_in_ptr.dtype.element_ty), mask=mask)


def _position_stride(t: torch.Tensor) -> int:
    """The spacing of the (h, w) positions of a tensor whose positions are evenly spaced
    (the op sends dense inputs)."""
    _, _, h, w = t.shape
    if w == 1:
        return t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t.stride(3)
    raise ValueError("global_avg_pool2d: the positions of input must be evenly spaced")


def global_avg_pool2d(input: torch.Tensor, out: torch.Tensor) -> None:
    n, c, h, w = input.shape
    hw = h * w
    acc = acc_dtype(input.dtype)
    pos_stride = _position_stride(input)
    if input.stride(1) < input.stride(3) and hw > 1:  # channels_last
        block_c = min(next_power_of_2(c), 64)
        block_p = max(1, min(next_power_of_2(hw), BLOCK // block_c))
        launchable(global_pool_channels_kernel)[(n, cdiv(c, block_c))](
            input, out, c, hw, input.stride(0), input.stride(1), pos_stride, out.stride(0), out.stride(1),
            ACC=acc, BLOCK_P=block_p, BLOCK_C=block_c)
    else:
        block_p = min(next_power_of_2(hw), 256)
        rows = max(1, BLOCK // block_p)
        launchable(global_pool_planes_kernel)[(cdiv(n * c, rows),)](
            input, out, n * c, c, hw, input.stride(0), input.stride(1), pos_stride, out.stride(0), out.stride(1),
            ACC=acc, ROWS=rows, BLOCK_P=block_p)


def global_avg_pool2d_backward(grad_output: torch.Tensor, grad_input: torch.Tensor) -> None:
    n, c, h, w = grad_input.shape
    total = grad_input.numel()
    launchable(global_pool_backward_kernel)[(cdiv(total, BLOCK),)](
        grad_output, grad_input, total, c, h, w, *grad_input.stride(), grad_output.stride(0), grad_output.stride(1),
        CHANNELS_LAST=grad_input.stride(1) < grad_input.stride(3), ACC=acc_dtype(grad_input.dtype), BLOCK=BLOCK)
