"""Triton kernels for local response normalisation across channels and its backward,
over dense tensors that share one layout, as flat arrays: element i is in channel
(i // cs) % C, cs being H*W (NCHW) or 1 (channels_last). Each element recomputes its
channel window (no sliding add/subtract, which cancels in float32).

Scalars reach a kernel as float32, so alpha, beta and k travel as a float32 pair
(hi + lo) that float64 kernels add back to near float64 precision."""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from fastcnn.triton.common import acc_dtype, cdiv, launchable

BLOCK = 1024


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def _window_s_div(x_ptr, offs, c, mask, C, cs, OFF_LO, OFF_HI, alpha_over_size, beta, k,
                  ACC: tl.constexpr, BETA_075: tl.constexpr):
    """s = k + alpha/size * (sum of x^2 over channels c + OFF_LO .. c + OFF_HI in [0, C)) and s^beta."""
    total = tl.zeros(offs.shape, dtype=ACC)
    for off in range(OFF_LO, OFF_HI + 1):
        ok = mask & (c + off >= 0) & (c + off < C)
        v = tl.load(x_ptr + offs + off * cs, mask=ok, other=0.0).to(ACC)
        total += v * v
    s = k + alpha_over_size * total
    if BETA_075:
        r = tl.sqrt(s)
        div = r * tl.sqrt(r)
    else:
        div = tl.exp2(beta * tl.log2(s))
    return s, div


@triton.jit
def lrn_forward_kernel(x_ptr, out_ptr, n, C, cs, OFF_LO, OFF_HI, a_hi, a_lo, b_hi, b_lo, k_hi, k_lo,
                       ACC: tl.constexpr, BETA_075: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = (offs // cs) % C
    s, div = _window_s_div(x_ptr, offs, c, mask, C, cs, OFF_LO, OFF_HI, _scalar(a_hi, a_lo, ACC),
                           _scalar(b_hi, b_lo, ACC), _scalar(k_hi, k_lo, ACC), ACC, BETA_075)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(out_ptr + offs, (x / div).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lrn_backward_terms_kernel(grad_ptr, x_ptr, terms_ptr, n, C, cs, OFF_LO, OFF_HI, a_hi, a_lo, b_hi, b_lo,
                              k_hi, k_lo, ACC: tl.constexpr, BETA_075: tl.constexpr, BLOCK: tl.constexpr):
    """terms = g x / (div s): what each output sends back to the inputs in its window."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    c = (offs // cs) % C
    s, div = _window_s_div(x_ptr, offs, c, mask, C, cs, OFF_LO, OFF_HI, _scalar(a_hi, a_lo, ACC),
                           _scalar(b_hi, b_lo, ACC), _scalar(k_hi, k_lo, ACC), ACC, BETA_075)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
    tl.store(terms_ptr + offs, (g * x / (div * s)).to(terms_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lrn_backward_kernel(grad_ptr, x_ptr, terms_ptr, grad_x_ptr, n, C, cs, OFF_LO, OFF_HI, BACK_LO, BACK_HI,
                        a_hi, a_lo, b_hi, b_lo, k_hi, k_lo, coef_hi, coef_lo,
                        ACC: tl.constexpr, BETA_075: tl.constexpr, BLOCK: tl.constexpr):
    """grad_x[j] = g[j] / div[j] - coef x[j] (sum of terms over c in j + BACK_LO .. j + BACK_HI)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    j = (offs // cs) % C
    s, div = _window_s_div(x_ptr, offs, j, mask, C, cs, OFF_LO, OFF_HI, _scalar(a_hi, a_lo, ACC),
                           _scalar(b_hi, b_lo, ACC), _scalar(k_hi, k_lo, ACC), ACC, BETA_075)
    total = tl.zeros(offs.shape, dtype=ACC)
    for off in range(BACK_LO, BACK_HI + 1):
        ok = mask & (j + off >= 0) & (j + off < C)
        total += tl.load(terms_ptr + offs + off * cs, mask=ok, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
    grad_x = g / div - _scalar(coef_hi, coef_lo, ACC) * x * total
    tl.store(grad_x_ptr + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _split(value: float) -> tuple[float, float]:
    """value as hi + lo, both float32."""
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


def _offsets(C: int, front: int, back: int) -> tuple[int, int]:
    """Channel offsets of a window [c - front, c + back], clipped to what C channels can reach."""
    return -min(front, C - 1), min(back, C - 1)


def _scalars(size: int, alpha: float, beta: float, k: float) -> tuple[float, ...]:
    return (*_split(alpha / size), *_split(beta), *_split(k))


def local_response_norm(x: torch.Tensor, out: torch.Tensor, cs: int, size: int, alpha: float, beta: float,
                        k: float) -> None:
    n, C = out.numel(), out.shape[1]
    launchable(lrn_forward_kernel)[(cdiv(n, BLOCK),)](
        x, out, n, C, cs, *_offsets(C, size // 2, (size - 1) // 2), *_scalars(size, alpha, beta, k),
        ACC=acc_dtype(out.dtype), BETA_075=beta == 0.75, BLOCK=BLOCK)


def local_response_norm_backward(grad: torch.Tensor, x: torch.Tensor, grad_x: torch.Tensor, cs: int, size: int,
                                 alpha: float, beta: float, k: float) -> None:
    n, C = grad_x.numel(), grad_x.shape[1]
    acc = torch.float64 if grad_x.dtype == torch.float64 else torch.float32
    terms = torch.empty_like(grad_x, dtype=acc)
    window = _offsets(C, size // 2, (size - 1) // 2)
    scalars = _scalars(size, alpha, beta, k)
    grid = (cdiv(n, BLOCK),)
    common = dict(ACC=acc_dtype(grad_x.dtype), BETA_075=beta == 0.75, BLOCK=BLOCK)
    launchable(lrn_backward_terms_kernel)[grid](grad, x, terms, n, C, cs, *window, *scalars, **common)
    launchable(lrn_backward_kernel)[grid](
        grad, x, terms, grad_x, n, C, cs, *window, *_offsets(C, (size - 1) // 2, size // 2), *scalars,
        *_split(2 * alpha * beta / size), **common)
