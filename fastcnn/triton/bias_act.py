"""Triton kernels for bias_act: out = act(x + bias[c]); backward grad_x = grad * act'(out)
and grad_bias = grad_x summed per channel.

The kernels take a dense tensor as a 2-D grid of rows and columns, so that no
element needs an integer division to find its channel:
  channel fastest (channels_last, (N, C)): rows = the other indices, columns = channels;
  otherwise (NCHW):                       rows = (n, c) planes, columns = the plane (inner).

The backward is a two-stage reduction split by the shape alone (deterministic, no
atomics): each program of stage one writes grad_x over one rectangle of one channel
tile's elements and stores its per-channel sums; stage two adds the splits in order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcnn.triton.common import (acc_dtype, act_code, act_grad_from_output, apply_act, cdiv, launchable,
                                   next_power_of_2)

TILE = 4096  # elements per forward program
SPLIT_ELEMS = 16384  # elements of one channel per backward program, at least
MAX_SPLITS = 512
CHANNEL_TILE = 64  # channels per backward program when channels are fastest...
ROWS_PER_SPLIT = 128  # ...and its rows: 8192 elements


@triton.jit
def bias_act_kernel(x_ptr, bias_ptr, out_ptr, rows, cols, C, col_blocks, ACT: tl.constexpr, ACC: tl.constexpr,
                    CHANNEL_FASTEST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr):
    pid = tl.program_id(0)
    r = (pid // col_blocks).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = (pid % col_blocks) * BLOCK_COL + tl.arange(0, BLOCK_COL)
    offs = r[:, None] * cols + k[None, :]
    mask = (r < rows)[:, None] & (k < cols)[None, :]
    x = tl.load(x_ptr + offs, mask=mask).to(ACC)
    if CHANNEL_FASTEST:
        b = tl.load(bias_ptr + k, mask=k < cols).to(ACC)[None, :]
    else:
        b = tl.load(bias_ptr + r % C, mask=r < rows).to(ACC)[:, None]
    tl.store(out_ptr + offs, apply_act(x + b, ACT).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def grad_from_output(grad, y, ACT: tl.constexpr):
    # A NaN output passes the gradient through ReLU, as torch's threshold_backward does.
    if ACT == 1:
        grad = tl.where(y <= 0, 0.0, grad).to(grad.dtype)
    else:
        grad = act_grad_from_output(grad, y, ACT)
    return grad


@triton.jit
def bias_act_backward_kernel(grad_ptr, out_ptr, grad_x_ptr, partial_ptr, C, inner, outer, rows_per_split,
                             cols_per_split, col_splits, ACT: tl.constexpr, ACC: tl.constexpr,
                             CHANNEL_FASTEST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_COL: tl.constexpr):
    # Program (channel tile, split); the split is a rectangle of rows x columns.
    split = tl.program_id(1)
    r_start = (split // col_splits).to(tl.int64) * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, outer)
    acc = tl.zeros([BLOCK_R, BLOCK_COL], dtype=ACC)
    if CHANNEL_FASTEST:  # columns are channels; one split of the rows
        cs = tl.program_id(0) * BLOCK_COL + tl.arange(0, BLOCK_COL)
        c_mask = cs < C
        for r0 in range(r_start, r_end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            offs = r[:, None] * C + cs[None, :]
            mask = (r < r_end)[:, None] & c_mask[None, :]
            g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
            y = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC)
            gx = grad_from_output(g, y, ACT)
            tl.store(grad_x_ptr + offs, gx.to(grad_x_ptr.dtype.element_ty), mask=mask)
            acc += tl.where(mask, gx, 0.0)
        tl.store(partial_ptr + split.to(tl.int64) * C + cs, tl.sum(acc, axis=0), mask=c_mask)
    else:  # one channel: rows are images, columns its plane of `inner` elements
        c = tl.program_id(0)
        k_start = (split % col_splits).to(tl.int64) * cols_per_split
        k_end = tl.minimum(k_start + cols_per_split, inner)
        for r0 in range(r_start, r_end, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
            base = (r * C + c) * inner
            for k0 in range(k_start, k_end, BLOCK_COL):
                k = k0 + tl.arange(0, BLOCK_COL).to(tl.int64)
                offs = base[:, None] + k[None, :]
                mask = (r < r_end)[:, None] & (k < k_end)[None, :]
                g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(ACC)
                y = tl.load(out_ptr + offs, mask=mask, other=0.0).to(ACC)
                gx = grad_from_output(g, y, ACT)
                tl.store(grad_x_ptr + offs, gx.to(grad_x_ptr.dtype.element_ty), mask=mask)
                acc += tl.where(mask, gx, 0.0)
        tl.store(partial_ptr + split.to(tl.int64) * C + c, tl.sum(tl.sum(acc, axis=1), axis=0))


@triton.jit
def sum_splits_kernel(partial_ptr, grad_bias_ptr, C, splits, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = cs < C
    total = tl.zeros([BLOCK_C], dtype=ACC)
    ptrs = partial_ptr + cs
    for _ in range(0, splits):  # in order: the same bits every run
        total += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += C
    tl.store(grad_bias_ptr + cs, total.to(grad_bias_ptr.dtype.element_ty), mask=mask)


def _grid_2d(n: int, C: int, inner: int) -> tuple[int, int]:
    """(rows, columns) of the forward's view; see the module docstring."""
    return (n // C, C) if inner == 1 else (n // inner, inner)


def bias_act(x: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, C: int, inner: int, act: str | None) -> None:
    rows, cols = _grid_2d(out.numel(), C, inner)
    block_col = min(next_power_of_2(cols), 1024)
    block_r = max(1, TILE // block_col)
    col_blocks = cdiv(cols, block_col)
    launchable(bias_act_kernel)[(cdiv(rows, block_r) * col_blocks,)](
        x, bias, out, rows, cols, C, col_blocks, ACT=act_code(act), ACC=acc_dtype(out.dtype),
        CHANNEL_FASTEST=inner == 1, BLOCK_R=block_r, BLOCK_COL=block_col)


def _round_up(v: int, m: int) -> int:
    return cdiv(v, m) * m


def backward_plan(C: int, inner: int, outer: int) -> dict:
    """Tile sizes and the split of each channel's (rows x columns) elements: fixed by
    the shape alone, so grad_bias has the same bits on every run."""
    if inner == 1:
        block_col, block_r = CHANNEL_TILE, 32
        cols_per_split, col_splits = C, 1
        rows_per_split = ROWS_PER_SPLIT
    else:
        block_col = min(next_power_of_2(inner), 512)
        block_r = max(1, 2048 // block_col)
        cols_per_split = min(_round_up(inner, block_col),
                             _round_up(max(SPLIT_ELEMS, cdiv(inner, MAX_SPLITS)), block_col))
        col_splits = cdiv(inner, cols_per_split)
        rows_per_split = _round_up(max(1, SPLIT_ELEMS // cols_per_split), block_r)
    row_splits_cap = max(1, MAX_SPLITS // col_splits)
    if cdiv(outer, rows_per_split) > row_splits_cap:
        rows_per_split = _round_up(cdiv(outer, row_splits_cap), block_r)
    return dict(block_col=block_col, block_r=block_r, rows_per_split=rows_per_split, cols_per_split=cols_per_split,
                col_splits=col_splits, splits=cdiv(outer, rows_per_split) * col_splits)


def bias_act_backward(grad: torch.Tensor, out: torch.Tensor, grad_x: torch.Tensor, grad_bias: torch.Tensor,
                      C: int, inner: int, act: str | None) -> None:
    outer = out.numel() // (C * inner)
    plan = backward_plan(C, inner, outer)
    channel_programs = cdiv(C, plan["block_col"]) if inner == 1 else C
    acc = acc_dtype(out.dtype)
    # Every element is written by stage one.
    partial = torch.empty((plan["splits"], C), dtype=torch.float64 if out.dtype == torch.float64 else torch.float32,
                          device=out.device)
    launchable(bias_act_backward_kernel)[(channel_programs, plan["splits"])](
        grad, out, grad_x, partial, C, inner, outer, plan["rows_per_split"], plan["cols_per_split"],
        plan["col_splits"], ACT=act_code(act), ACC=acc, CHANNEL_FASTEST=inner == 1, BLOCK_R=plan["block_r"],
        BLOCK_COL=plan["block_col"])
    sum_block_c = 128
    launchable(sum_splits_kernel)[(cdiv(C, sum_block_c),)](
        partial, grad_bias, C, plan["splits"], ACC=acc, BLOCK_C=sum_block_c)
