"""Triton kernels for add_act: out = act(a + b), and grad_in = grad * act'(out),
over dense tensors that share one layout, as flat arrays."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastcnn.triton.common import acc_dtype, act_code, act_grad_from_output, apply_act, cdiv, launchable

BLOCK = 4096


@triton.jit
def add_act_kernel(a_ptr, b_ptr, out_ptr, n, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(a_ptr + offs, mask=mask).to(ACC)
    b = tl.load(b_ptr + offs, mask=mask).to(ACC)
    out = apply_act(a + b, ACT)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def add_act_backward_kernel(grad_ptr, out_ptr, grad_in_ptr, n, ACT: tl.constexpr, ACC: tl.constexpr,
                            BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    grad = tl.load(grad_ptr + offs, mask=mask).to(ACC)
    y = tl.load(out_ptr + offs, mask=mask).to(ACC)
    tl.store(grad_in_ptr + offs, act_grad_from_output(grad, y, ACT).to(grad_in_ptr.dtype.element_ty),
             mask=mask)


def add_act(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, act: str | None) -> None:
    n = out.numel()
    launchable(add_act_kernel)[(cdiv(n, BLOCK),)](
        a, b, out, n, ACT=act_code(act), ACC=acc_dtype(out.dtype), BLOCK=BLOCK)


def add_act_backward(grad: torch.Tensor, out: torch.Tensor, grad_in: torch.Tensor, act: str | None) -> None:
    n = out.numel()
    launchable(add_act_backward_kernel)[(cdiv(n, BLOCK),)](
        grad, out, grad_in, n, ACT=act_code(act), ACC=acc_dtype(out.dtype), BLOCK=BLOCK)
