"""fastcnn::max_pool2d: max pooling returning (output, indices), as torch's
max_pool2d_with_indices: indices are int64, flat h * W + w within each plane.

NaN semantics as PyTorch: a window's max starts at -inf with the index of its
first in-bounds position, and an element replaces it if greater or NaN (the first
max wins ties, the last NaN wins). Both outputs follow the input's layout.
fastcnn::max_pool2d_no_indices returns the output alone, for inference: the same
kernels, told to keep no index (int64 indices would double the bytes written).
It has no gradient; fastcnn.functional.max_pool2d picks it when none is needed.
Backward: fastcnn::max_pool2d_backward sends each gradient to its index. It is
deterministic on every backend, and adds in ascending output order as PyTorch
does: the CPU kernel scatters with each part of grad_input (a plane, or an
image's block of channels) owned by one thread; the CUDA and Triton kernels
gather (each grad_input element sums the windows that picked it), no atomics.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fastcnn import _native, backends
from fastcnn.ops.checks import check_matches, check_tensor
from fastcnn.ops.launch import backend_table
from fastcnn.ops.layout import dense_in, memory_format_of, new_like
from fastcnn.ops.pool_geometry import PoolParams, geometry, pool_params
from fastcnn.ops.triton_route import route_to_triton_when_compiled
from fastcnn.ops import autocast, direct, prepared

_WINDOW = "int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation, bool ceil_mode"
FORWARD_SCHEMA = f"(Tensor input, {_WINDOW}) -> (Tensor, Tensor)"
NO_INDICES_SCHEMA = f"(Tensor input, {_WINDOW}) -> Tensor"
BACKWARD_SCHEMA = f"(Tensor grad_output, Tensor indices, Tensor input, {_WINDOW}) -> Tensor"


def check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode) -> PoolParams:
    check_tensor("input", input, ndim=4)
    if any(size == 0 for size in input.shape[1:]):
        raise ValueError(f"input must have non-zero channels, height and width, got shape {tuple(input.shape)}")
    return pool_params(input, kernel_size, stride, padding, dilation, ceil_mode)


def _output_shape(input: Tensor, params: PoolParams) -> tuple:
    return (input.shape[0], input.shape[1], *params.output_hw(input.shape[2], input.shape[3]))


def _new_outputs(input: Tensor, params: PoolParams) -> tuple[Tensor, Tensor]:
    shape = _output_shape(input, params)
    return new_like(input, shape), new_like(input, shape, dtype=torch.int64)


# --- forward kernels, one per backend: (input, out, indices, params); input may
# have any strides, out and indices are dense in the input's layout. indices None:
# the values only (the native kernels take a null pointer).

def _reference_values(input: Tensor, p: PoolParams) -> Tensor:
    """The pooled values from differentiable PyTorch ops. Where a dilated window can lie
    wholly in the padding, torch's indices for it point past the plane and its backward
    writes there: the input is padded with -inf explicitly instead (every index inside
    the padded tensor), and the extra windows a ceil_mode without padding adds are cut."""
    if not any(d > 1 and pad > 0 for d, pad in zip(p.dilation, p.padding)):
        return torch.nn.functional.max_pool2d(input, p.kernel, p.stride, p.padding, p.dilation,
                                              ceil_mode=p.ceil_mode)
    ph, pw = p.padding
    padded = torch.nn.functional.pad(input, (pw, pw, ph, ph), value=-math.inf)
    values = torch.nn.functional.max_pool2d(padded, p.kernel, p.stride, 0, p.dilation, ceil_mode=p.ceil_mode)
    oh, ow = p.output_hw(input.shape[-2], input.shape[-1])
    return values[..., :oh, :ow]


def reference_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode) -> tuple[Tensor, Tensor]:
    """fastcnn::max_pool2d in PyTorch ops, for torch.func transforms (direct.register_reference)."""
    p = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    if input.is_cuda:
        input = input.contiguous()  # the indices torch's CUDA kernel gives channels_last: see _torch_max_pool2d
    _, indices = torch.nn.functional.max_pool2d(input.detach(), p.kernel, p.stride, p.padding, p.dilation,
                                                ceil_mode=p.ceil_mode, return_indices=True)
    return _reference_values(input, p), indices


def reference_max_pool2d_no_indices(input, kernel_size, stride, padding, dilation, ceil_mode) -> Tensor:
    """fastcnn::max_pool2d_no_indices in PyTorch ops, for torch.func transforms."""
    return _reference_values(input, check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode))


def _torch_max_pool2d(input, out, indices, p):
    window = (p.kernel, p.stride, p.padding, p.dilation)
    if indices is None:
        out.copy_(torch.nn.functional.max_pool2d(input, *window, ceil_mode=p.ceil_mode))
        return
    if input.is_cuda:
        # From an NCHW copy: torch's CUDA kernel for channels_last points a window of
        # -inf at element 0, which can lie outside it; NCHW (and every CPU layout) points
        # at the window's first element, as the other backends do.
        input = input.contiguous()
    values, where = torch.nn.functional.max_pool2d(input, *window, ceil_mode=p.ceil_mode, return_indices=True)
    out.copy_(values)
    indices.copy_(where)


def _pointer(t: Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _cpu_max_pool2d(input, out, indices, p):
    _native.load("_cpu").max_pool2d(input.data_ptr(), out.data_ptr(), _pointer(indices), geometry(p, input, out),
                                    _native.dtype_code(out))


def _cuda_max_pool2d(input, out, indices, p):
    _native.load("_cuda").max_pool2d(input.data_ptr(), out.data_ptr(), _pointer(indices),
                                     geometry(p, input, out), _native.dtype_code(out), _native.stream_of(out))


def _triton_max_pool2d(input, out, indices, p):
    from fastcnn.triton import max_pool2d as kernels
    kernels.max_pool2d(input, out, indices, geometry(p, input, out))


FORWARD = backend_table(torch=_torch_max_pool2d, cpu=_cpu_max_pool2d, cuda=_cuda_max_pool2d,
                        triton=_triton_max_pool2d)


@direct.custom_op("fastcnn::max_pool2d", mutates_args=(), schema=FORWARD_SCHEMA)
def max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    params = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    out, indices = _new_outputs(input, params)
    if out.numel():
        FORWARD[backends.resolve(input.device)](input, out, indices, params)
    return out, indices


@max_pool2d.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode):
    return _new_outputs(input, check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode))


# --- inference: the output alone, from the same launchers

@direct.custom_op("fastcnn::max_pool2d_no_indices", mutates_args=(), schema=NO_INDICES_SCHEMA)
def max_pool2d_no_indices(input, kernel_size, stride, padding, dilation, ceil_mode):
    params = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    out = new_like(input, _output_shape(input, params))
    if out.numel():
        FORWARD[backends.resolve(input.device)](input, out, None, params)
    return out


@max_pool2d_no_indices.register_fake
def _(input, kernel_size, stride, padding, dilation, ceil_mode):
    params = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    return new_like(input, _output_shape(input, params))


def prepare_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode):
    """A launcher (input) -> output for an eager inference call of
    fastcnn.functional.max_pool2d with 4-D input (no indices: prepared.py)."""
    if input.dim() != 4:
        return None
    params = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    launch = FORWARD[backends.resolve(input.device)]
    return prepared.allocating(_output_shape(input, params), lambda x, out: launch(x, out, None, params), input)


def _no_indices_backward(ctx, grad_output):
    raise RuntimeError("fastcnn::max_pool2d_no_indices has no gradient (it keeps no indices): "
                       "use fastcnn::max_pool2d, as fastcnn.functional.max_pool2d does for inputs that require grad")


max_pool2d_no_indices.register_autograd(_no_indices_backward)


# --- backward: grad_input[index] += grad_output, launchers (grad_output, indices,
# grad_input, params), grad_output and indices dense in grad_input's layout

def _torch_max_pool2d_backward(grad_output, indices, grad_input, p):
    # A window wholly in the padding (dilation > 1) points outside the plane, and aten's
    # backward scatters there unchecked (out of bounds): such windows pass no gradient.
    outside = (indices < 0) | (indices >= grad_input.shape[-2] * grad_input.shape[-1])
    grad_output, indices = grad_output.masked_fill(outside, 0), indices.masked_fill(outside, 0)
    # aten reads only the sizes and layout of its `self` argument: grad_input stands in for input.
    grad_input.copy_(torch.ops.aten.max_pool2d_with_indices_backward(
        grad_output, grad_input, list(p.kernel), list(p.stride), list(p.padding), list(p.dilation), p.ceil_mode,
        indices))


def _cpu_max_pool2d_backward(grad_output, indices, grad_input, p):
    _native.load("_cpu").max_pool2d_backward(grad_output.data_ptr(), indices.data_ptr(), grad_input.data_ptr(),
                                             geometry(p, grad_input, grad_output), _native.dtype_code(grad_input))


def _cuda_max_pool2d_backward(grad_output, indices, grad_input, p):
    _native.load("_cuda").max_pool2d_backward(grad_output.data_ptr(), indices.data_ptr(), grad_input.data_ptr(),
                                              geometry(p, grad_input, grad_output), _native.dtype_code(grad_input),
                                              _native.stream_of(grad_input))


def _triton_max_pool2d_backward(grad_output, indices, grad_input, p):
    from fastcnn.triton import max_pool2d as kernels
    kernels.max_pool2d_backward(grad_output, indices, grad_input, geometry(p, grad_input, grad_output))


BACKWARD = backend_table(torch=_torch_max_pool2d_backward, cpu=_cpu_max_pool2d_backward, cuda=_cuda_max_pool2d_backward,
                         triton=_triton_max_pool2d_backward)


def check_max_pool2d_backward(grad_output, indices, input, kernel_size, stride, padding, dilation,
                              ceil_mode) -> PoolParams:
    params = check_max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode)
    check_tensor("grad_output", grad_output, ndim=4)
    check_matches("grad_output", grad_output, "input", input, shape=False)
    expected = _output_shape(input, params)
    if tuple(grad_output.shape) != expected:
        raise ValueError(f"grad_output has shape {tuple(grad_output.shape)} but the pooled output has {expected}")
    if not isinstance(indices, Tensor):
        raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {indices.dtype}")
    if indices.device != input.device:
        raise ValueError(f"indices is on {indices.device} but input is on {input.device}")
    if tuple(indices.shape) != expected:
        raise ValueError(f"indices has shape {tuple(indices.shape)} but the pooled output has {expected}")
    return params


def _backward_into(grad_output, indices, grad_input, params, launchers) -> None:
    if grad_input.numel():
        fmt = memory_format_of(grad_input)
        launchers(dense_in(grad_output, fmt), dense_in(indices, fmt), grad_input, params)


@direct.custom_op("fastcnn::max_pool2d_backward", mutates_args=(), schema=BACKWARD_SCHEMA)
def max_pool2d_backward(grad_output, indices, input, kernel_size, stride, padding, dilation, ceil_mode):
    params = check_max_pool2d_backward(grad_output, indices, input, kernel_size, stride, padding, dilation,
                                       ceil_mode)
    grad_input = new_like(input)
    _backward_into(grad_output, indices, grad_input, params, BACKWARD[backends.resolve(input.device)])
    return grad_input


def _prepare_max_pool2d_backward(grad_output, indices, input, kernel_size, stride, padding, dilation, ceil_mode):
    """fastcnn::max_pool2d_backward's body for arguments with this signature
    (direct.register_prepare): grad_output and indices dense in input's layout."""
    params = check_max_pool2d_backward(grad_output, indices, input, kernel_size, stride, padding, dilation,
                                       ceil_mode)
    fmt = memory_format_of(input)
    if not (input.numel() and grad_output.is_contiguous(memory_format=fmt)
            and indices.is_contiguous(memory_format=fmt)):
        return None
    launch = BACKWARD[backends.resolve(input.device)]
    run = prepared.allocating(input.shape, lambda g, i, like, grad_in: launch(g, i, grad_in, params), input)
    return lambda g, i, like, *_: run(g, i, like)


direct.register_prepare("fastcnn::max_pool2d_backward", _prepare_max_pool2d_backward)


@max_pool2d_backward.register_fake
def _(grad_output, indices, input, kernel_size, stride, padding, dilation, ceil_mode):
    check_max_pool2d_backward(grad_output, indices, input, kernel_size, stride, padding, dilation, ceil_mode)
    return new_like(input)


def _setup_context(ctx, inputs, output):
    input, *window = inputs
    _, indices = output
    ctx.window = window
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)  # else autograd fills a zero gradient for the indices
    ctx.save_for_backward(input, indices)


def _backward(ctx, grad_output, _grad_indices):
    if grad_output is None:
        return None, None, None, None, None, None
    input, indices = ctx.saved_tensors
    grad_input = direct.call("fastcnn::max_pool2d_backward", grad_output, indices, input, *ctx.window)
    return grad_input, None, None, None, None, None


direct.register_autograd(max_pool2d, "fastcnn::max_pool2d", _backward, _setup_context)


def _setup_backward_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])  # indices


def _backward_backward(ctx, grad_grad_input):
    """max_pool2d_backward scatters each output gradient to its window's maximum, so
    its own gradient gathers from there (as torch's double backward does)."""
    (indices,) = ctx.saved_tensors
    n, c = indices.shape[:2]
    d_grad_output = grad_grad_input.reshape(n, c, -1).gather(2, indices.reshape(n, c, -1)).view(indices.shape)
    return d_grad_output, None, None, None, None, None, None, None


max_pool2d_backward.register_autograd(_backward_backward, setup_context=_setup_backward_context)
autocast.register("fastcnn::max_pool2d", autocast.KEEP)
autocast.register("fastcnn::max_pool2d_no_indices", autocast.KEEP)


# --- Triton twins that torch.compile traces into (see triton_route.py)

# triton_op infers its schema from the annotations (int[] here, where the public ops say int[2]).
@torch.library.triton_op("fastcnn::max_pool2d_triton", mutates_args=())
def max_pool2d_triton(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], ceil_mode: bool) -> tuple[Tensor, Tensor]:
    params = pool_params(input, kernel_size, stride, padding, dilation, ceil_mode)
    out, indices = _new_outputs(input, params)
    if out.numel():
        _triton_max_pool2d(input, out, indices, params)
    return out, indices


@torch.library.triton_op("fastcnn::max_pool2d_no_indices_triton", mutates_args=())
def max_pool2d_no_indices_triton(input: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
                                 dilation: list[int], ceil_mode: bool) -> Tensor:
    params = pool_params(input, kernel_size, stride, padding, dilation, ceil_mode)
    out = new_like(input, _output_shape(input, params))
    if out.numel():
        _triton_max_pool2d(input, out, None, params)
    return out


@torch.library.triton_op("fastcnn::max_pool2d_backward_triton", mutates_args=())
def max_pool2d_backward_triton(grad_output: Tensor, indices: Tensor, input: Tensor, kernel_size: list[int],
                               stride: list[int], padding: list[int], dilation: list[int],
                               ceil_mode: bool) -> Tensor:
    params = pool_params(input, kernel_size, stride, padding, dilation, ceil_mode)
    grad_input = new_like(input)
    _backward_into(grad_output, indices, grad_input, params, _triton_max_pool2d_backward)
    return grad_input


route_to_triton_when_compiled(max_pool2d, max_pool2d_triton)
route_to_triton_when_compiled(max_pool2d_no_indices, max_pool2d_no_indices_triton)
route_to_triton_when_compiled(max_pool2d_backward, max_pool2d_backward_triton)

direct.register_reference("fastcnn::max_pool2d", reference_max_pool2d)
direct.register_reference("fastcnn::max_pool2d_no_indices", reference_max_pool2d_no_indices)
