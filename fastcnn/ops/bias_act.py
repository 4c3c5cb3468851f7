"""fastcnn::bias_act: per-channel bias then an activation, out = act(x + bias[c]),
with the channel on dim 1 of x ((N, C) for a fully connected layer, (N, C, H, W)
for a convolution).

One pass over memory where eager PyTorch makes two (`torch.relu(x + b.view(...))`).
Backward: fastcnn::bias_act_backward gives grad_x = grad * act'(out) from the
saved output and, in the same pass, grad_bias = grad_x summed over every dim but
the channel, deterministically (a fixed partition, no atomics).

The kernels see x dense in its layout as a flat array in which element i has
channel (i // inner) % C: inner = prod(shape[2:]) for contiguous tensors, and
inner = 1 for channels_last (the channel varies fastest).
"""

from __future__ import annotations

import math
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
from fastcnn.ops.precision import acc_dtype

ACTS = (None, "relu", "tanh", "sigmoid")


def check_bias_act(x, bias, act) -> None:
    check_tensor("x", x, min_ndim=2)
    check_tensor("bias", bias, ndim=1)
    check_matches("bias", bias, "x", x, shape=False)
    if bias.shape[0] != x.shape[1]:
        raise ValueError(f"bias must have x.shape[1] = {x.shape[1]} elements, got shape {tuple(bias.shape)}")
    check_act(act, ACTS)


def channel_view(t: Tensor) -> tuple[int, int]:
    """(C, inner) of a tensor dense in memory_format_of(t)."""
    if memory_format_of(t) == torch.channels_last:
        return t.shape[1], 1
    return t.shape[1], math.prod(t.shape[2:])



def _broadcast_shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


# --- forward kernels, one per backend: (x, bias, out, act); x dense in out's layout, bias contiguous

def _torch_act(y: Tensor, act) -> Tensor:
    return {None: lambda v: v, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act](y)


def _bias_act_values(x, bias, act) -> Tensor:
    """In the accumulation dtype, as the kernels compute it."""
    return _torch_act(x.to(acc_dtype(x.dtype)) + bias.to(acc_dtype(x.dtype)).view(_broadcast_shape(x)), act)


def _torch_bias_act(x, bias, out, act):
    out.copy_(_bias_act_values(x, bias, act))


def reference_bias_act(x, bias, act="relu") -> Tensor:
    """fastcnn::bias_act in PyTorch ops, for torch.func transforms (direct.register_reference)."""
    check_bias_act(x, bias, act)
    return _bias_act_values(x, bias, act).to(x.dtype)


def _cpu_bias_act(x, bias, out, act):
    channels, inner = channel_view(out)
    _native.load("_cpu").bias_act(x.data_ptr(), bias.data_ptr(), out.data_ptr(), out.numel(), channels, inner,
                                  _native.dtype_code(out), _native.ACT_CODES[act])


def _cuda_bias_act(x, bias, out, act):
    channels, inner = channel_view(out)
    _native.load("_cuda").bias_act(x.data_ptr(), bias.data_ptr(), out.data_ptr(), out.numel(), channels, inner,
                                   _native.dtype_code(out), _native.ACT_CODES[act], _native.stream_of(out))


def _triton_bias_act(x, bias, out, act):
    from fastcnn.triton import bias_act as kernels
    channels, inner = channel_view(out)
    kernels.bias_act(x, bias, out, channels, inner, act)


FORWARD = backend_table(torch=_torch_bias_act, cpu=_cpu_bias_act, cuda=_cuda_bias_act,
                        triton=_triton_bias_act)


def _run_forward(launch, x: Tensor, bias: Tensor, act) -> Tensor:
    out = new_like(x)
    if out.numel():
        launch(dense_in(x, memory_format_of(out)), bias.contiguous(), out, act)
    return out


@direct.custom_op("fastcnn::bias_act", mutates_args=())
def bias_act(x: Tensor, bias: Tensor, act: Optional[str] = "relu") -> Tensor:
    check_bias_act(x, bias, act)
    return _run_forward(FORWARD[backends.resolve(x.device)], x, bias, act)


@bias_act.register_fake
def _(x, bias, act="relu"):
    check_bias_act(x, bias, act)
    return new_like(x)


# --- backward: grad_x = grad * act'(out), grad_bias = grad_x summed per channel.
# Kernels: (grad, out, grad_x, grad_bias, act), grad dense in out's layout.

def _torch_bias_act_backward(grad, out, grad_x, grad_bias, act):
    acc = acc_dtype(out.dtype)
    g, y = grad.to(acc), out.to(acc)
    if act == "relu":
        gx = torch.ops.aten.threshold_backward(g, y, 0)
    elif act == "tanh":
        gx = torch.ops.aten.tanh_backward(g, y)
    elif act == "sigmoid":
        gx = torch.ops.aten.sigmoid_backward(g, y)
    else:
        gx = g
    grad_x.copy_(gx)
    grad_bias.copy_(gx.sum(dim=[d for d in range(gx.dim()) if d != 1]))


def _cpu_bias_act_backward(grad, out, grad_x, grad_bias, act):
    channels, inner = channel_view(out)
    _native.load("_cpu").bias_act_backward(grad.data_ptr(), out.data_ptr(), grad_x.data_ptr(), grad_bias.data_ptr(),
                                           out.numel(), channels, inner, _native.dtype_code(out),
                                           _native.ACT_CODES[act])


def _cuda_bias_act_backward(grad, out, grad_x, grad_bias, act):
    channels, inner = channel_view(out)
    module = _native.load("_cuda")
    workspace = torch.empty(module.bias_act_backward_workspace(out.numel(), channels, inner),
                            dtype=acc_dtype(out.dtype), device=out.device)
    module.bias_act_backward(grad.data_ptr(), out.data_ptr(), grad_x.data_ptr(), grad_bias.data_ptr(),
                             workspace.data_ptr(), out.numel(), channels, inner, _native.dtype_code(out),
                             _native.ACT_CODES[act], _native.stream_of(out))


def _triton_bias_act_backward(grad, out, grad_x, grad_bias, act):
    from fastcnn.triton import bias_act as kernels
    channels, inner = channel_view(out)
    kernels.bias_act_backward(grad, out, grad_x, grad_bias, channels, inner, act)


BACKWARD = backend_table(torch=_torch_bias_act_backward, cpu=_cpu_bias_act_backward, cuda=_cuda_bias_act_backward,
                         triton=_triton_bias_act_backward)


def check_bias_act_backward(grad, out, act) -> None:
    check_tensor("grad", grad)
    check_tensor("out", out, min_ndim=2)
    check_matches("grad", grad, "out", out)
    check_act(act, ACTS)


def _new_grads(out: Tensor) -> tuple[Tensor, Tensor]:
    return new_like(out), out.new_empty(out.shape[1])


def _run_backward(launch, grad: Tensor, out: Tensor, act) -> tuple[Tensor, Tensor]:
    grad_x, grad_bias = _new_grads(out)
    if grad_x.numel():
        launch(dense_in(grad, memory_format_of(grad_x)), out, grad_x, grad_bias, act)
    else:
        grad_bias.zero_()  # the sum over an empty batch
    return grad_x, grad_bias


@direct.custom_op("fastcnn::bias_act_backward", mutates_args=())
def bias_act_backward(grad: Tensor, out: Tensor, act: Optional[str] = "relu") -> tuple[Tensor, Tensor]:
    check_bias_act_backward(grad, out, act)
    out = dense_in(out, memory_format_of(out))
    return _run_backward(BACKWARD[backends.resolve(out.device)], grad, out, act)


def _prepare_bias_act_backward(grad, out, act):
    """fastcnn::bias_act_backward's body for arguments with this signature: both
    tensors dense in out's layout, and not empty."""
    check_bias_act_backward(grad, out, act)
    fmt = memory_format_of(out)
    if not (out.numel() and out.is_contiguous(memory_format=fmt) and grad.is_contiguous(memory_format=fmt)):
        return None
    launch, shape, channels = BACKWARD[backends.resolve(out.device)], tuple(out.shape), out.shape[1]

    def run(grad, out, _):
        grad_x = torch.empty(shape, dtype=out.dtype, device=out.device, memory_format=fmt)
        grad_bias = out.new_empty(channels)
        launch(grad, out, grad_x, grad_bias, act)
        return grad_x, grad_bias
    return run


direct.register_prepare("fastcnn::bias_act_backward", _prepare_bias_act_backward)


@bias_act_backward.register_fake
def _(grad, out, act="relu"):
    check_bias_act_backward(grad, out, act)
    return _new_grads(out)


def _setup_context(ctx, inputs, output):
    ctx.act = inputs[2]
    ctx.save_for_backward(output)


def _backward(ctx, grad):
    (out,) = ctx.saved_tensors
    grad_x, grad_bias = direct.call("fastcnn::bias_act_backward", grad, out, ctx.act)
    return grad_x, grad_bias, None


direct.register_autograd(bias_act, "fastcnn::bias_act", _backward, _setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad, out, ctx.act = inputs
    ctx.save_for_backward(grad, out)


def _backward_backward(ctx, grad_grad_x, grad_grad_bias):
    """bias_act_backward's own gradients: grad_x = act'(out) * grad and grad_bias =
    grad_x summed over every dim but 1, so both incoming gradients reach grad through
    act'(out), and out (through act'') where the activation is curved."""
    grad, out = ctx.saved_tensors
    per_channel = [1, -1] + [1] * (grad.dim() - 2)
    grad_grad = grad_grad_x + grad_grad_bias.view(per_channel)
    d_grad, d_out = grad_from_output_backward(grad_grad, grad, out, ctx.act)
    return d_grad, d_out, None


bias_act_backward.register_autograd(_backward_backward, setup_context=_setup_backward_context)
autocast.register("fastcnn::bias_act", autocast.WIDEST)


# --- Triton twins that torch.compile traces into (see triton_route.py)

@torch.library.triton_op("fastcnn::bias_act_triton", mutates_args=())
def bias_act_triton(x: Tensor, bias: Tensor, act: Optional[str] = "relu") -> Tensor:
    return _run_forward(_triton_bias_act, x, bias, act)


@torch.library.triton_op("fastcnn::bias_act_backward_triton", mutates_args=())
def bias_act_backward_triton(grad: Tensor, out: Tensor, act: Optional[str] = "relu") -> tuple[Tensor, Tensor]:
    out = dense_in(out, memory_format_of(out))
    return _run_backward(_triton_bias_act_backward, grad, out, act)


route_to_triton_when_compiled(bias_act, bias_act_triton)
route_to_triton_when_compiled(bias_act_backward, bias_act_backward_triton)

direct.register_reference("fastcnn::bias_act", reference_bias_act)
