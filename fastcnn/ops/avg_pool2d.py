"""fastcnn::avg_pool2d: average pooling of (N, C, H, W) input, as
torch.nn.functional.avg_pool2d computes it (without divisor_override).

The window of output oh spans [oh*sH - pH, min(oh*sH - pH + kH, H + pH)); its
divisor is that span (count_include_pad) or the part of it inside the image.
Backward: fastcnn::avg_pool2d_backward gathers, for each input element, grad /
divisor over the windows that hold it: no atomics, the same bits every run.
"""

from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from fastcnn import _native, backends
from fastcnn.ops.checks import check_matches, check_tensor
from fastcnn.ops.launch import backend_table
from fastcnn.ops.layout import dense_in, memory_format_of, new_like
from fastcnn.ops.pool_geometry import PoolParams, geometry, pool_params
from fastcnn.ops.triton_route import route_to_triton_when_compiled
from fastcnn.ops import autocast, direct, prepared

_ARGS = "int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode, bool count_include_pad"
FORWARD_SCHEMA = f"(Tensor input, {_ARGS}) -> Tensor"
BACKWARD_SCHEMA = f"(Tensor grad_output, Tensor input, {_ARGS}) -> Tensor"


def check_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad) -> PoolParams:
    """Checks the op's arguments; returns the window as pairs."""
    check_tensor("input", input, ndim=4)
    if 0 in input.shape[1:]:
        raise ValueError(f"input must have non-zero channels, height and width, got shape {tuple(input.shape)}")
    if not isinstance(count_include_pad, bool):
        raise TypeError(f"count_include_pad must be a bool, got {count_include_pad!r}")
    return pool_params(input, kernel_size, stride, padding, 1, ceil_mode)


def _output_shape(input: Tensor, p: PoolParams) -> tuple[int, ...]:
    return (*input.shape[:2], *p.output_hw(*input.shape[-2:]))


# --- forward kernels, one per backend: (input, out, params, count_include_pad), input dense in out's layout

def _torch_avg_pool2d(x, out, p, count_include_pad):
    out.copy_(torch.nn.functional.avg_pool2d(x, p.kernel, p.stride, p.padding, p.ceil_mode, count_include_pad))


def reference_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad) -> Tensor:
    """fastcnn::avg_pool2d in PyTorch ops, for torch.func transforms (direct.register_reference)."""
    p = check_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    if input.is_cuda and any(p.padding):
        input = input.contiguous()  # torch's CUDA backward for channels_last with padding: see below
    return torch.nn.functional.avg_pool2d(input, p.kernel, p.stride, p.padding, p.ceil_mode, count_include_pad)


def _cpu_avg_pool2d(x, out, p, count_include_pad):
    _native.load("_cpu").avg_pool2d(x.data_ptr(), out.data_ptr(), geometry(p, x, out), count_include_pad,
                                    _native.dtype_code(out))


def _cuda_avg_pool2d(x, out, p, count_include_pad):
    _native.load("_cuda").avg_pool2d(x.data_ptr(), out.data_ptr(), geometry(p, x, out), count_include_pad,
                                     _native.dtype_code(out), _native.stream_of(out))


def _triton_avg_pool2d(x, out, p, count_include_pad):
    from fastcnn.triton import avg_pool2d as kernels
    kernels.avg_pool2d(x, out, p, count_include_pad)


FORWARD = backend_table(torch=_torch_avg_pool2d, cpu=_cpu_avg_pool2d, cuda=_cuda_avg_pool2d,
                        triton=_triton_avg_pool2d)


def _forward(launch, input, kernel_size, stride, padding, ceil_mode, count_include_pad) -> Tensor:
    p = check_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    out = new_like(input, _output_shape(input, p))
    if out.numel():
        launch(dense_in(input, memory_format_of(input)), out, p, count_include_pad)
    return out


@direct.custom_op("fastcnn::avg_pool2d", mutates_args=(), schema=FORWARD_SCHEMA)
def avg_pool2d(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int], ceil_mode: bool,
               count_include_pad: bool) -> Tensor:
    return _forward(FORWARD[backends.resolve(input.device)], input, kernel_size, stride, padding, ceil_mode,
                    count_include_pad)


def prepare_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad):
    """A launcher (input) -> output for an eager inference call of
    fastcnn.functional.avg_pool2d with 4-D input, dense in its layout (prepared.py)."""
    if input.dim() != 4 or not input.is_contiguous(memory_format=memory_format_of(input)):
        return None
    p = check_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    launch = FORWARD[backends.resolve(input.device)]
    return prepared.allocating(_output_shape(input, p), lambda x, out: launch(x, out, p, count_include_pad), input)


@avg_pool2d.register_fake
def _(input, kernel_size, stride, padding, ceil_mode, count_include_pad):
    p = check_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    return new_like(input, _output_shape(input, p))


# --- backward: grad_input in input's layout; input gives only its shape and layout

def _torch_avg_pool2d_backward(grad, grad_in, p, count_include_pad):
    like = grad_in
    if grad.is_cuda and any(p.padding):
        # NCHW operands: torch's CUDA kernel for channels_last leaves the padding out of
        # its window arithmetic and returns wrong gradients (pytorch/pytorch#188344).
        grad, like = grad.contiguous(), grad_in.new_empty(grad_in.shape)
    grad_in.copy_(torch.ops.aten.avg_pool2d_backward(grad, like, p.kernel, p.stride, p.padding, p.ceil_mode,
                                                     count_include_pad, None))


def _cpu_avg_pool2d_backward(grad, grad_in, p, count_include_pad):
    _native.load("_cpu").avg_pool2d_backward(grad.data_ptr(), grad_in.data_ptr(), geometry(p, grad_in, grad),
                                             count_include_pad, _native.dtype_code(grad_in))


def _cuda_avg_pool2d_backward(grad, grad_in, p, count_include_pad):
    _native.load("_cuda").avg_pool2d_backward(grad.data_ptr(), grad_in.data_ptr(), geometry(p, grad_in, grad),
                                              count_include_pad, _native.dtype_code(grad_in),
                                              _native.stream_of(grad_in))


def _triton_avg_pool2d_backward(grad, grad_in, p, count_include_pad):
    from fastcnn.triton import avg_pool2d as kernels
    kernels.avg_pool2d_backward(grad, grad_in, p, count_include_pad)


BACKWARD = backend_table(torch=_torch_avg_pool2d_backward, cpu=_cpu_avg_pool2d_backward,
                         cuda=_cuda_avg_pool2d_backward, triton=_triton_avg_pool2d_backward)


def check_avg_pool2d_backward(grad_output, input, kernel_size, stride, padding, ceil_mode,
                              count_include_pad) -> PoolParams:
    p = check_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    check_tensor("grad_output", grad_output, ndim=4)
    check_matches("grad_output", grad_output, "input", input, shape=False)
    expected = _output_shape(input, p)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"grad_output has shape {tuple(grad_output.shape)} but the pooled input has {expected}")
    return p


def _backward_op(launch, grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad) -> Tensor:
    p = check_avg_pool2d_backward(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    grad_in = new_like(input)
    if grad_in.numel():
        launch(dense_in(grad_output, memory_format_of(input)), grad_in, p, count_include_pad)
    return grad_in


@direct.custom_op("fastcnn::avg_pool2d_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def avg_pool2d_backward(grad_output: Tensor, input: Tensor, kernel_size: List[int], stride: List[int],
                        padding: List[int], ceil_mode: bool, count_include_pad: bool) -> Tensor:
    return _backward_op(BACKWARD[backends.resolve(input.device)], grad_output, input, kernel_size, stride, padding,
                        ceil_mode, count_include_pad)


def _prepare_backward_op(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad):
    """fastcnn::avg_pool2d_backward's body for arguments with this signature:
    grad_output dense in input's layout."""
    p = check_avg_pool2d_backward(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    fmt = memory_format_of(input)
    if not (input.numel() and grad_output.is_contiguous(memory_format=fmt)):
        return None
    launch = BACKWARD[backends.resolve(input.device)]
    run = prepared.allocating(input.shape, lambda g, like, grad_in: launch(g, grad_in, p, count_include_pad), input)
    return lambda g, like, *_: run(g, like)


direct.register_prepare("fastcnn::avg_pool2d_backward", _prepare_backward_op)


@avg_pool2d_backward.register_fake
def _(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad):
    check_avg_pool2d_backward(grad_output, input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    return new_like(input)


def _setup_context(ctx, inputs, output):
    input, *ctx.window = inputs
    ctx.save_for_backward(input)


def _backward(ctx, grad):
    (input,) = ctx.saved_tensors
    return (direct.call("fastcnn::avg_pool2d_backward", grad, input, *ctx.window),) + (None,) * 5


def _prepare_avg_pool2d_op(input, kernel_size, stride, padding, ceil_mode, count_include_pad):
    """fastcnn::avg_pool2d's body for arguments with this signature (direct.register_prepare)."""
    run = prepare_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    return None if run is None else lambda x, *_: run(x)


def prepare_avg_pool2d_grad(input, kernel_size, stride, padding, ceil_mode, count_include_pad):
    """A launcher for a call of fastcnn.functional.avg_pool2d that autograd records:
    fastcnn::avg_pool2d's Function over its prepared body."""
    if input.dim() != 4:
        return None
    p = check_avg_pool2d(input, kernel_size, stride, padding, ceil_mode, count_include_pad)
    window = (list(p.kernel), list(p.stride), list(p.padding), p.ceil_mode, count_include_pad)
    run = _prepare_avg_pool2d_op(input, *window)
    return None if run is None else lambda x: direct.apply("fastcnn::avg_pool2d", run, x, *window)


direct.register_autograd(avg_pool2d, "fastcnn::avg_pool2d", _backward, _setup_context)
autocast.register("fastcnn::avg_pool2d", autocast.KEEP)
direct.register_prepare("fastcnn::avg_pool2d", _prepare_avg_pool2d_op)


# The backward is linear in grad_output and is the forward's transpose, so its own
# gradient (for double backward) is the forward pooling of the incoming gradient.
def _setup_context_backward(ctx, inputs, output):
    ctx.window = inputs[2:]


def _backward_backward(ctx, grad_grad_input):
    return (torch.ops.fastcnn.avg_pool2d(grad_grad_input, *ctx.window),) + (None,) * 6


avg_pool2d_backward.register_autograd(_backward_backward, setup_context=_setup_context_backward)


# --- Triton twins that torch.compile traces into (see triton_route.py); they call the
# launchers unwrapped. triton_op infers its schema from the annotations (int[] here,
# where the public ops say int[2]).

@torch.library.triton_op("fastcnn::avg_pool2d_triton", mutates_args=())
def avg_pool2d_triton(input: Tensor, kernel_size: List[int], stride: List[int], padding: List[int],
                      ceil_mode: bool, count_include_pad: bool) -> Tensor:
    return _forward(_triton_avg_pool2d, input, kernel_size, stride, padding, ceil_mode, count_include_pad)


@torch.library.triton_op("fastcnn::avg_pool2d_backward_triton", mutates_args=())
def avg_pool2d_backward_triton(grad_output: Tensor, input: Tensor, kernel_size: List[int], stride: List[int],
                               padding: List[int], ceil_mode: bool, count_include_pad: bool) -> Tensor:
    return _backward_op(_triton_avg_pool2d_backward, grad_output, input, kernel_size, stride, padding, ceil_mode,
                        count_include_pad)


route_to_triton_when_compiled(avg_pool2d, avg_pool2d_triton)
route_to_triton_when_compiled(avg_pool2d_backward, avg_pool2d_backward_triton)

direct.register_reference("fastcnn::avg_pool2d", reference_avg_pool2d)
