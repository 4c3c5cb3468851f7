"""Triton kernels for avg_pool2d and its backward, with PyTorch's window and divisor
rules; any strides. Programs walk the elements in the memory order of their layout
(NCHW or channels_last) so that loads and stores coalesce."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcnn.ops.pool_geometry import PoolParams
from fastcnn.triton.common import acc_dtype, cdiv, launchable

BLOCK = 256


@triton.jit
def _unflatten(offs, C, Y, X, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        c = offs % C
        rest = offs // C
        x = rest % X
        rest = rest // X
        y = rest % Y
        n = rest // Y
    else:
        x = offs % X
        rest = offs // X
        y = rest % Y
        rest = rest // Y
        c = rest % C
        n = rest // C
    return n, c, y, x


@triton.jit
def _axis_divisor(o, size, k, s, p, COUNT_INCLUDE_PAD: tl.constexpr):
    # Span up to size + p with padding counted, else the part inside [0, size); at least
    # 1, so that an empty window (not reachable through the op's checks) averages to 0.
    start = o * s - p
    stop = tl.minimum(start + k, size + p)
    if COUNT_INCLUDE_PAD:
        d = stop - start
    else:
        d = tl.minimum(stop, size) - tl.maximum(start, 0)
    return tl.maximum(d, 1)


@triton.jit
def avg_pool2d_kernel(in_ptr, out_ptr, total, C, H, W, OH, OW, kH, kW, sH, sW, pH, pW,
                      is0, is1, is2, is3, os0, os1, os2, os3,
                      COUNT_INCLUDE_PAD: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, oh, ow = _unflatten(offs, C, OH, OW, CHANNELS_LAST)
    h0 = oh * sH - pH
    w0 = ow * sW - pW
    base = n * is0 + c * is1
    acc = tl.zeros([BLOCK], dtype=ACC)
    for kh in range(0, kH):  # ih then iw, as PyTorch sums
        ih = h0 + kh
        row_ok = mask & (ih >= 0) & (ih < H)
        for kw in range(0, kW):
            iw = w0 + kw
            ok = row_ok & (iw >= 0) & (iw < W)
            acc += tl.load(in_ptr + base + ih * is2 + iw * is3, mask=ok, other=0.0).to(ACC)
    divisor = (_axis_divisor(oh, H, kH, sH, pH, COUNT_INCLUDE_PAD)
               * _axis_divisor(ow, W, kW, sW, pW, COUNT_INCLUDE_PAD))
    divisor = tl.where(mask, divisor, 1)
    tl.store(out_ptr + n * os0 + c * os1 + oh * os2 + ow * os3,
             (acc / divisor.to(ACC)).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def avg_pool2d_backward_kernel(grad_out_ptr, grad_in_ptr, total, C, H, W, OH, OW, kH, kW, sH, sW, pH, pW,
                               is0, is1, is2, is3, os0, os1, os2, os3, MAX_OH, MAX_OW,
                               COUNT_INCLUDE_PAD: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                               ACC: tl.constexpr, BLOCK: tl.constexpr):
    # A gather: each input element sums grad / divisor over the windows holding it
    # (at most MAX_OH x MAX_OW of them), in (oh, ow) order.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, ih, iw = _unflatten(offs, C, H, W, CHANNELS_LAST)
    # Output o holds input i when o*s - p <= i < o*s - p + k.
    oh0 = tl.where(ih + pH < kH, 0, (ih + pH - kH) // sH + 1)
    oh1 = tl.minimum((ih + pH) // sH + 1, OH)
    ow0 = tl.where(iw + pW < kW, 0, (iw + pW - kW) // sW + 1)
    ow1 = tl.minimum((iw + pW) // sW + 1, OW)
    base = n * os0 + c * os1
    acc = tl.zeros([BLOCK], dtype=ACC)
    for i in range(0, MAX_OH):
        oh = oh0 + i
        row_ok = mask & (oh < oh1)
        dh = _axis_divisor(oh, H, kH, sH, pH, COUNT_INCLUDE_PAD)
        for j in range(0, MAX_OW):
            ow = ow0 + j
            ok = row_ok & (ow < ow1)
            g = tl.load(grad_out_ptr + base + oh * os2 + ow * os3, mask=ok, other=0.0).to(ACC)
            divisor = tl.where(ok, dh * _axis_divisor(ow, W, kW, sW, pW, COUNT_INCLUDE_PAD), 1)
            acc += tl.where(ok, g / divisor.to(ACC), 0.0)
    tl.store(grad_in_ptr + n * is0 + c * is1 + ih * is2 + iw * is3, acc.to(grad_in_ptr.dtype.element_ty),
             mask=mask)


def _channels_last(t: torch.Tensor) -> bool:
    return t.stride(1) < t.stride(3)


def avg_pool2d(input: torch.Tensor, out: torch.Tensor, p: PoolParams, count_include_pad: bool) -> None:
    n, c, h, w = input.shape
    oh, ow = out.shape[-2:]
    total = out.numel()
    launchable(avg_pool2d_kernel)[(cdiv(total, BLOCK),)](
        input, out, total, c, h, w, oh, ow, *p.kernel, *p.stride, *p.padding, *input.stride(), *out.stride(),
        COUNT_INCLUDE_PAD=count_include_pad, CHANNELS_LAST=_channels_last(out), ACC=acc_dtype(out.dtype),
        BLOCK=BLOCK)


def avg_pool2d_backward(grad_output: torch.Tensor, grad_input: torch.Tensor, p: PoolParams,
                        count_include_pad: bool) -> None:
    n, c, h, w = grad_input.shape
    oh, ow = grad_output.shape[-2:]
    total = grad_input.numel()
    max_oh = cdiv(p.kernel[0], p.stride[0])
    max_ow = cdiv(p.kernel[1], p.stride[1])
    launchable(avg_pool2d_backward_kernel)[(cdiv(total, BLOCK),)](
        grad_output, grad_input, total, c, h, w, oh, ow, *p.kernel, *p.stride, *p.padding, *grad_input.stride(),
        *grad_output.stride(), max_oh, max_ow, COUNT_INCLUDE_PAD=count_include_pad,
        CHANNELS_LAST=_channels_last(grad_input), ACC=acc_dtype(grad_input.dtype), BLOCK=BLOCK)
