"""fastcnn::global_avg_pool2d: the mean over H and W of each (n, c) of (N, C, H, W)
input, as torch.nn.functional.adaptive_avg_pool2d(input, 1) computes it; the
(N, C, 1, 1) output is in input's layout.

Each sum runs in an order fixed by the shape (never by the thread count), so
the result has the same bits every run. Backward:
fastcnn::global_avg_pool2d_backward spreads grad / (H*W) over each plane.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastcnn import _native, backends
from fastcnn.ops.checks import check_matches, check_tensor
from fastcnn.ops.launch import backend_table
from fastcnn.ops.layout import dense_in, memory_format_of, new_like
from fastcnn.ops.triton_route import route_to_triton_when_compiled
from fastcnn.ops import autocast, direct, prepared


def check_global_avg_pool2d(input) -> None:
    check_tensor("input", input, ndim=4)
    if 0 in input.shape[2:]:  # no channels is an empty output, as in torch; no pixels has no mean
        raise ValueError(f"input must have non-zero height and width, got shape {tuple(input.shape)}")


def _pooled_like(input: Tensor) -> Tensor:
    return new_like(input, (*input.shape[:2], 1, 1))


def _shape_list(big: Tensor, pooled: Tensor) -> list[int]:
    """The 10 integers of GlobalPoolShape: sizes and strides of the (N, C, H, W)
    tensor, then the N and C strides of the pooled one."""
    return [*big.shape, *big.stride(), pooled.stride(0), pooled.stride(1)]


# --- forward kernels, one per backend: (input, out), input dense in its layout

def _torch_global_avg_pool2d(x, out):
    out.copy_(x.mean((2, 3), keepdim=True))


def reference_global_avg_pool2d(input) -> Tensor:
    """fastcnn::global_avg_pool2d in PyTorch ops, for torch.func transforms (direct.register_reference)."""
    check_global_avg_pool2d(input)
    return input.mean((2, 3), keepdim=True)


def _cpu_global_avg_pool2d(x, out):
    _native.load("_cpu").global_avg_pool2d(x.data_ptr(), out.data_ptr(), _shape_list(x, out), _native.dtype_code(out))


def _cuda_global_avg_pool2d(x, out):
    _native.load("_cuda").global_avg_pool2d(x.data_ptr(), out.data_ptr(), _shape_list(x, out),
                                            _native.dtype_code(out), _native.stream_of(out))


def _triton_global_avg_pool2d(x, out):
    from fastcnn.triton import global_avg_pool2d as kernels
    kernels.global_avg_pool2d(x, out)


FORWARD = backend_table(torch=_torch_global_avg_pool2d, cpu=_cpu_global_avg_pool2d, cuda=_cuda_global_avg_pool2d,
                        triton=_triton_global_avg_pool2d)


def _forward(launch, input: Tensor) -> Tensor:
    check_global_avg_pool2d(input)
    out = _pooled_like(input)
    if out.numel():
        launch(dense_in(input, memory_format_of(input)), out)
    return out


@direct.custom_op("fastcnn::global_avg_pool2d", mutates_args=())
def global_avg_pool2d(input: Tensor) -> Tensor:
    return _forward(FORWARD[backends.resolve(input.device)], input)


def prepare_global_avg_pool2d(input):
    """A launcher (input) -> output for an eager inference call of
    fastcnn.functional.global_avg_pool2d with 4-D input, dense in its layout (prepared.py)."""
    if input.dim() != 4 or not input.is_contiguous(memory_format=memory_format_of(input)):
        return None
    check_global_avg_pool2d(input)
    return prepared.allocating((*input.shape[:2], 1, 1), FORWARD[backends.resolve(input.device)], input)


@global_avg_pool2d.register_fake
def _(input):
    check_global_avg_pool2d(input)
    return _pooled_like(input)


# --- backward: grad_input[n, c, h, w] = grad_output[n, c] / (H*W), in input's layout;
# grad_output is read through its strides (an expanded one needs no copy)

def _torch_global_avg_pool2d_backward(grad, grad_in):
    h, w = grad_in.shape[-2:]
    grad_in.copy_((grad / (h * w)).expand_as(grad_in))


def _cpu_global_avg_pool2d_backward(grad, grad_in):
    _native.load("_cpu").global_avg_pool2d_backward(grad.data_ptr(), grad_in.data_ptr(), _shape_list(grad_in, grad),
                                                    _native.dtype_code(grad_in))


def _cuda_global_avg_pool2d_backward(grad, grad_in):
    _native.load("_cuda").global_avg_pool2d_backward(grad.data_ptr(), grad_in.data_ptr(),
                                                     _shape_list(grad_in, grad), _native.dtype_code(grad_in),
                                                     _native.stream_of(grad_in))


def _triton_global_avg_pool2d_backward(grad, grad_in):
    from fastcnn.triton import global_avg_pool2d as kernels
    kernels.global_avg_pool2d_backward(grad, grad_in)


BACKWARD = backend_table(torch=_torch_global_avg_pool2d_backward, cpu=_cpu_global_avg_pool2d_backward,
                         cuda=_cuda_global_avg_pool2d_backward, triton=_triton_global_avg_pool2d_backward)


def check_global_avg_pool2d_backward(grad_output, input) -> None:
    check_global_avg_pool2d(input)
    check_tensor("grad_output", grad_output, ndim=4)
    check_matches("grad_output", grad_output, "input", input, shape=False)
    expected = (*input.shape[:2], 1, 1)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"grad_output has shape {tuple(grad_output.shape)} but the pooled input has {expected}")


def _backward_op(launch, grad_output: Tensor, input: Tensor) -> Tensor:
    check_global_avg_pool2d_backward(grad_output, input)
    grad_in = new_like(input)
    if grad_in.numel():
        launch(grad_output, grad_in)
    return grad_in


@direct.custom_op("fastcnn::global_avg_pool2d_backward", mutates_args=())
def global_avg_pool2d_backward(grad_output: Tensor, input: Tensor) -> Tensor:
    return _backward_op(BACKWARD[backends.resolve(input.device)], grad_output, input)


@global_avg_pool2d_backward.register_fake
def _(grad_output, input):
    check_global_avg_pool2d_backward(grad_output, input)
    return new_like(input)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, grad):
    (input,) = ctx.saved_tensors
    return direct.call("fastcnn::global_avg_pool2d_backward", grad, input)


direct.register_autograd(global_avg_pool2d, "fastcnn::global_avg_pool2d", _backward, _setup_context)
autocast.register("fastcnn::global_avg_pool2d", autocast.KEEP)


# The backward is the forward's transpose: its gradient (double backward) is the
# forward pooling of the incoming gradient.
def _backward_backward(ctx, grad_grad_input):
    return torch.ops.fastcnn.global_avg_pool2d(grad_grad_input), None


global_avg_pool2d_backward.register_autograd(_backward_backward, setup_context=lambda ctx, inputs, output: None)


# --- Triton twins that torch.compile traces into (see triton_route.py); they call the
# launchers unwrapped.

@torch.library.triton_op("fastcnn::global_avg_pool2d_triton", mutates_args=())
def global_avg_pool2d_triton(input: Tensor) -> Tensor:
    return _forward(_triton_global_avg_pool2d, input)


@torch.library.triton_op("fastcnn::global_avg_pool2d_backward_triton", mutates_args=())
def global_avg_pool2d_backward_triton(grad_output: Tensor, input: Tensor) -> Tensor:
    return _backward_op(_triton_global_avg_pool2d_backward, grad_output, input)


route_to_triton_when_compiled(global_avg_pool2d, global_avg_pool2d_triton)
route_to_triton_when_compiled(global_avg_pool2d_backward, global_avg_pool2d_backward_triton)

direct.register_reference("fastcnn::global_avg_pool2d", reference_global_avg_pool2d)
