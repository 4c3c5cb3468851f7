"""The activations' gradients taken from their output, as torch ops: what the backward
ops' own backward (a double backward: gradient penalties, Hessian-vector products)
is made of. Rare enough that clarity beats a kernel; torch's formulas, so each result
is itself differentiable."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def grad_from_output(grad: Tensor, out: Tensor, act: Optional[str]) -> Tensor:
    """The gradient before `act` from the one after it and act's output."""
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, out, 0)
    if act == "tanh":
        return torch.ops.aten.tanh_backward(grad, out)
    if act == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, out)
    return grad


def grad_from_output_backward(grad_grad: Tensor, grad: Tensor, out: Tensor,
                              act: Optional[str]) -> tuple[Tensor, Optional[Tensor]]:
    """The gradients of grad_from_output(grad, out, act) with respect to grad and to
    out, given grad_grad, the gradient of its result; None for out where it is zero
    (ReLU's mask, no activation)."""
    d_grad = grad_from_output(grad_grad, out, act)
    if act == "tanh":  # d/d out of grad * (1 - out^2)
        return d_grad, -2 * grad_grad * grad * out
    if act == "sigmoid":  # d/d out of grad * out * (1 - out)
        return d_grad, grad_grad * grad * (1 - 2 * out)
    return d_grad, None
