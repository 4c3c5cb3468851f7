"""fastcnn::add_act: the residual add followed by an activation, out = act(a + b).

One pass over memory where eager PyTorch makes two (`torch.relu(a + b)`).
Backward: fastcnn::add_act_backward gives grad * act'(out), the gradient of
both a and b, from the saved output.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastcnn import _native, backends
from fastcnn.ops.checks import check_act, check_matches, check_tensor
from fastcnn.ops.launch import backend_table
from fastcnn.ops.layout import dense_in, memory_format_of, new_like
from fastcnn.ops.triton_route import route_to_triton_when_compiled
from fastcnn.ops import autocast, direct
from fastcnn.ops.activation_grad import grad_from_output_backward

ACTS = (None, "relu")


def check_add_act(a, b, act) -> None:
    check_tensor("a", a)
    check_tensor("b", b)
    check_matches("b", b, "a", a)
    check_act(act, ACTS)


# --- forward kernels, one per backend: (a, b, out, act), all dense in out's layout

def _add_act_values(a, b, act) -> Tensor:
    return torch.relu(a + b) if act == "relu" else a + b


def _torch_add_act(a, b, out, act):
    out.copy_(_add_act_values(a, b, act))


def reference_add_act(a, b, act="relu") -> Tensor:
    """fastcnn::add_act in PyTorch ops, for torch.func transforms (direct.register_reference)."""
    check_add_act(a, b, act)
    return _add_act_values(a, b, act)


def _cpu_add_act(a, b, out, act):
    _native.load("_cpu").add_act(a.data_ptr(), b.data_ptr(), out.data_ptr(), out.numel(),
                                 _native.dtype_code(out), _native.ACT_CODES[act])


def _cuda_add_act(a, b, out, act):
    _native.load("_cuda").add_act(a.data_ptr(), b.data_ptr(), out.data_ptr(), out.numel(),
                                  _native.dtype_code(out), _native.ACT_CODES[act], _native.stream_of(out))


def _triton_add_act(a, b, out, act):
    from fastcnn.triton import add_act as kernels
    kernels.add_act(a, b, out, act)


FORWARD = backend_table(torch=_torch_add_act, cpu=_cpu_add_act, cuda=_cuda_add_act,
                        triton=_triton_add_act)


def _run(launch, like: Tensor, x: Tensor, y: Tensor, act) -> Tensor:
    """A new tensor in like's layout, filled by launch(x, y, result, act) with x and y made
    dense in that layout: forward (a, b) and backward (grad, out) alike."""
    result = new_like(like)
    if result.numel():
        fmt = memory_format_of(result)
        launch(dense_in(x, fmt), dense_in(y, fmt), result, act)
    return result


@direct.custom_op("fastcnn::add_act", mutates_args=())
def add_act(a: Tensor, b: Tensor, act: Optional[str] = "relu") -> Tensor:
    check_add_act(a, b, act)
    return _run(FORWARD[backends.resolve(a.device)], a, a, b, act)


@add_act.register_fake
def _(a, b, act="relu"):
    check_add_act(a, b, act)
    return new_like(a)


# --- backward: grad_in = grad * act'(out)

def _torch_add_act_backward(grad, out, grad_in, act):
    grad_in.copy_(torch.ops.aten.threshold_backward(grad, out, 0) if act == "relu" else grad)


def _cpu_add_act_backward(grad, out, grad_in, act):
    _native.load("_cpu").add_act_backward(grad.data_ptr(), out.data_ptr(), grad_in.data_ptr(), out.numel(),
                                          _native.dtype_code(out), _native.ACT_CODES[act])


def _cuda_add_act_backward(grad, out, grad_in, act):
    _native.load("_cuda").add_act_backward(grad.data_ptr(), out.data_ptr(), grad_in.data_ptr(), out.numel(),
                                           _native.dtype_code(out), _native.ACT_CODES[act],
                                           _native.stream_of(out))


def _triton_add_act_backward(grad, out, grad_in, act):
    from fastcnn.triton import add_act as kernels
    kernels.add_act_backward(grad, out, grad_in, act)


BACKWARD = backend_table(torch=_torch_add_act_backward, cpu=_cpu_add_act_backward, cuda=_cuda_add_act_backward,
                         triton=_triton_add_act_backward)


def check_add_act_backward(grad, out, act) -> None:
    check_tensor("grad", grad)
    check_tensor("out", out)
    check_matches("grad", grad, "out", out)
    check_act(act, ACTS)


@direct.custom_op("fastcnn::add_act_backward", mutates_args=())
def add_act_backward(grad: Tensor, out: Tensor, act: Optional[str] = "relu") -> Tensor:
    check_add_act_backward(grad, out, act)
    return _run(BACKWARD[backends.resolve(out.device)], out, grad, out, act)


@add_act_backward.register_fake
def _(grad, out, act="relu"):
    check_add_act_backward(grad, out, act)
    return new_like(out)


def _setup_context(ctx, inputs, output):
    ctx.act = inputs[2]
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    if ctx.act is None:
        return grad, grad, None
    (out,) = ctx.saved_tensors
    grad_in = direct.call("fastcnn::add_act_backward", grad, out, ctx.act)
    return grad_in, grad_in, None


direct.register_autograd(add_act, "fastcnn::add_act", _backward, _setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad, out, ctx.act = inputs
    ctx.save_for_backward(grad, out)


def _backward_backward(ctx, grad_grad):
    grad, out = ctx.saved_tensors
    d_grad, d_out = grad_from_output_backward(grad_grad, grad, out, ctx.act)
    return d_grad, d_out, None


add_act_backward.register_autograd(_backward_backward, setup_context=_setup_backward_context)
autocast.register("fastcnn::add_act", autocast.WIDEST)


# --- Triton twins that torch.compile traces into (see triton_route.py)

@torch.library.triton_op("fastcnn::add_act_triton", mutates_args=())
def add_act_triton(a: Tensor, b: Tensor, act: Optional[str] = "relu") -> Tensor:
    return _run(_triton_add_act, a, a, b, act)


@torch.library.triton_op("fastcnn::add_act_backward_triton", mutates_args=())
def add_act_backward_triton(grad: Tensor, out: Tensor, act: Optional[str] = "relu") -> Tensor:
    return _run(_triton_add_act_backward, out, grad, out, act)


route_to_triton_when_compiled(add_act, add_act_triton)
route_to_triton_when_compiled(add_act_backward, add_act_backward_triton)

direct.register_reference("fastcnn::add_act", reference_add_act)
