"""Triton kernels for max_pool2d: the output with torch's int64 indices (or without
them, for inference: INDICES=False drops the index bookkeeping), and the
backward as a gather (each grad_input element sums the gradients of the windows
that picked it, in a fixed order: no atomics, the same bits every run).

Elements are numbered in their tensor's memory order (channels fastest for
channels_last) so that neighbouring lanes touch neighbouring addresses; strides
come from the geometry list (fastcnn/ops/pool_geometry.py)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcnn.triton.common import acc_dtype, cdiv, launchable

BLOCK = 512


@triton.jit
def _coords(offs, C, Y, X, CHANNELS_LAST: tl.constexpr):
    if CHANNELS_LAST:
        c = offs % C
        t = offs // C
        x = t % X
        t = t // X
        y = t % Y
        n = t // Y
    else:
        x = offs % X
        t = offs // X
        y = t % Y
        t = t // Y
        c = t % C
        n = t // C
    return n, c, y, x


@triton.jit
def max_pool2d_kernel(in_ptr, out_ptr, ind_ptr, total, C, H, W, OH, OW, kH, kW, sH, sW, pH, pW, dH, dW,
                      isn, isc, ish, isw, osn, osc, osh, osw,
                      CHANNELS_LAST: tl.constexpr, INDICES: tl.constexpr, ACC: tl.constexpr,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, oh, ow = _coords(offs, C, OH, OW, CHANNELS_LAST)
    h0 = oh * sH - pH
    w0 = ow * sW - pW
    # The running max starts at -inf with the index of the first in-bounds tap, as in torch.
    h_first = tl.where(h0 < 0, h0 + (dH - 1 - h0) // dH * dH, h0)
    w_first = tl.where(w0 < 0, w0 + (dW - 1 - w0) // dW * dW, w0)
    best = tl.full([BLOCK], float("-inf"), ACC)
    best_idx = h_first * W + w_first
    plane = n * isn + c * isc
    # Taps in torch's order; a greater value or a NaN replaces the max (the last NaN wins).
    for kh in range(0, kH):
        ih = h0 + kh * dH
        row_ok = mask & (ih >= 0) & (ih < H)
        for kw in range(0, kW):
            iw = w0 + kw * dW
            ok = row_ok & (iw >= 0) & (iw < W)
            v = tl.load(in_ptr + plane + ih * ish + iw * isw, mask=ok, other=float("-inf")).to(ACC)
            take = ok & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            if INDICES:
                best_idx = tl.where(take, ih * W + iw, best_idx)
    o = n * osn + c * osc + oh * osh + ow * osw
    tl.store(out_ptr + o, best.to(out_ptr.dtype.element_ty), mask=mask)
    if INDICES:
        tl.store(ind_ptr + o, best_idx.to(tl.int64), mask=mask)


@triton.jit
def max_pool2d_backward_kernel(grad_out_ptr, ind_ptr, grad_in_ptr, total, C, H, W, OH, OW, kH, kW, sH, sW,
                               pH, pW, dH, dW, isn, isc, ish, isw, osn, osc, osh, osw,
                               CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    n, c, y, x = _coords(offs, C, H, W, CHANNELS_LAST)
    self_idx = y * W + x
    base = n * osn + c * osc
    acc = tl.zeros([BLOCK], ACC)
    # Output (oh, ow) holds (y, x) as tap (kh, kw) when y = oh * sH - pH + kh * dH (same
    # for x). Taps from the last down visit the windows in ascending output order.
    for kh_from_end in range(0, kH):
        th = y + pH - (kH - 1 - kh_from_end) * dH
        oh = th // sH
        row_ok = mask & (th >= 0) & (th % sH == 0) & (oh < OH)
        for kw_from_end in range(0, kW):
            tw = x + pW - (kW - 1 - kw_from_end) * dW
            ow = tw // sW
            ok = row_ok & (tw >= 0) & (tw % sW == 0) & (ow < OW)
            o = base + oh * osh + ow * osw
            picked = tl.load(ind_ptr + o, mask=ok, other=-1) == self_idx
            acc += tl.load(grad_out_ptr + o, mask=ok & picked, other=0.0).to(ACC)
    tl.store(grad_in_ptr + n * isn + c * isc + y * ish + x * isw, acc.to(grad_in_ptr.dtype.element_ty), mask=mask)


def _channels_last(t: torch.Tensor) -> bool:
    return t.stride(1) < t.stride(3)


def max_pool2d(input: torch.Tensor, out: torch.Tensor, indices: torch.Tensor | None, geometry: list[int]) -> None:
    """out and indices share one layout (indices None: values only); geometry as
    pool_geometry.geometry(params, input, out)."""
    total = out.numel()
    n, c, h, w, oh, ow, *window_and_strides = geometry
    # Without indices, out stands in for the pointer the kernel never uses.
    launchable(max_pool2d_kernel)[(cdiv(total, BLOCK),)](
        input, out, out if indices is None else indices, total, c, h, w, oh, ow, *window_and_strides,
        CHANNELS_LAST=_channels_last(out), INDICES=indices is not None, ACC=acc_dtype(out.dtype), BLOCK=BLOCK)


def max_pool2d_backward(grad_out: torch.Tensor, indices: torch.Tensor, grad_in: torch.Tensor,
                        geometry: list[int]) -> None:
    """grad_out and indices share one layout; geometry as pool_geometry.geometry(params, grad_in, grad_out)."""
    total = grad_in.numel()
    n, c, h, w, oh, ow, *window_and_strides = geometry
    launchable(max_pool2d_backward_kernel)[(cdiv(total, BLOCK),)](
        grad_out, indices, grad_in, total, c, h, w, oh, ow, *window_and_strides,
        CHANNELS_LAST=_channels_last(grad_in), ACC=acc_dtype(grad_in.dtype), BLOCK=BLOCK)
