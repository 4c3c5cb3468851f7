"""fastcnn::conv2d: the seed's residual block in one kernel,

    out = act(conv2d(input, weight; stride, padding, dilation, groups) + bias + residual)

with bias and residual optional. The kernels are implicit GEMMs (M = N·OH·OW output
pixels, N = output channels, K = C/groups·KH·KW) that apply the epilogue to the tile
before storing it, so the output is written once instead of four times.

- fastcnn::conv2d_into writes the result into a channel slice of a larger tensor
  (an Inception module's branches fill one output, no torch.cat); inference only.
- Backward: fastcnn::bias_act_backward turns the output gradient into the
  pre-activation gradient (from the saved output) and the bias gradient in one
  pass; that gradient is the residual's gradient as it is, and feeds
  fastcnn::conv2d_input_grad (a gather-style implicit GEMM: strides by index math,
  no zero insertion) and fastcnn::conv2d_weight_grad (a reduction over N·OH·OW in
  an order fixed by the shape: the same bits every run).

Kernels take every tensor with its strides, so NCHW, channels_last and slices all
run without copies; channels_last is the layout they are fast in. The output
follows the input's layout, as in PyTorch. Padding travels as four ints
(top, left, bottom, right): see conv_geometry.py.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcnn import _native, backends
from fastcnn.ops.checks import check_act, check_layer_bias, check_matches, check_tensor
from fastcnn.ops.conv_geometry import ConvParams, conv_params, geometry
from fastcnn.ops.launch import backend_table, bound_triton
from fastcnn.ops.layout import memory_format_of, new_like
from fastcnn.ops.packed_weights import packed_conv_weight
from fastcnn.ops.triton_route import route_to_triton_when_compiled
from fastcnn.ops import autocast, direct, prepared
from fastcnn.ops.precision import acc_dtype, conv_allows_tf32, tf32_reader

ACTS = (None, "relu", "tanh", "sigmoid")


def check_conv2d(input, weight, bias, residual, stride, padding, dilation, groups, act) -> ConvParams:
    check_tensor("input", input, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_matches("weight", weight, "input", input, shape=False)
    params = conv_params(input, weight, stride, padding, dilation, groups)
    check_layer_bias(bias, input, weight)
    if residual is not None:
        check_tensor("residual", residual, ndim=4)
        check_matches("residual", residual, "input", input, shape=False)
        expected = output_shape(input, weight, params)
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual must have the output's shape {expected}, got {tuple(residual.shape)}")
    check_act(act, ACTS)
    return params


def output_shape(input, weight, params: ConvParams) -> tuple[int, int, int, int]:
    return (input.shape[0], weight.shape[0], *params.output_hw(*input.shape[2:], *weight.shape[2:]))



def _ptr(t: Optional[Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _strides(t: Optional[Tensor]) -> list[int]:
    return [0, 0, 0, 0] if t is None else list(t.stride())


# --- the torch reference: PyTorch's convolution in the accumulation dtype

def torch_act(y: Tensor, act) -> Tensor:
    return {None: lambda v: v, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}[act](y)


def _symmetric(params: ConvParams) -> bool:
    top, left, bottom, right = params.padding
    return top == bottom and left == right


def _padded_for_torch(x: Tensor, params: ConvParams) -> tuple[Tensor, list[int]]:
    """x and the padding to give PyTorch: uneven padding is applied explicitly."""
    if _symmetric(params):
        return x, list(params.padding[:2])
    top, left, bottom, right = params.padding
    return F.pad(x, (left, right, top, bottom)), [0, 0]


def _conv2d_values(x, w, bias, residual, params: ConvParams, act, acc: torch.dtype) -> Tensor:
    """In `acc`, the output's accumulation dtype, as the kernels compute it."""
    xp, pad = _padded_for_torch(x.to(acc), params)
    y = F.conv2d(xp, w.to(acc), None if bias is None else bias.to(acc), params.stride, pad, params.dilation,
                 params.groups)
    if residual is not None:
        y = y + residual.to(acc)
    return torch_act(y, act)


def _torch_conv2d(x, w, bias, residual, out, params: ConvParams, act):
    out.copy_(_conv2d_values(x, w, bias, residual, params, act, acc_dtype(out.dtype)))


def reference_conv2d(input, weight, bias, residual, stride, padding, dilation, groups, act) -> Tensor:
    """fastcnn::conv2d in PyTorch ops, for torch.func transforms (direct.register_reference)."""
    params = check_conv2d(input, weight, bias, residual, stride, padding, dilation, groups, act)
    return _conv2d_values(input, weight, bias, residual, params, act, acc_dtype(input.dtype)).to(input.dtype)


def _cpu_conv2d(x, w, bias, residual, out, params, act):
    _bind_cpu_conv2d(x, w, residual, out, params, act)(x, w, bias, residual, out)


def _bind_cpu_conv2d(x, w, residual, out, params, act, pack_weight=False):
    """The CPU launch with everything but the data pointers worked out: a prepared
    launcher binds once and then only reads pointers. pack_weight: keep the weight
    packed between calls (packed_weights.py).

    A kernel larger than 1x1 reads the input in channels_last, where a kernel row's
    taps lie back to back; other input is copied to channels_last first, which costs
    less than gathering each pixel's channels a plane apart (LeNet-5's 6->16 5x5
    conv at batch 8: 124 -> 87 us; a 3->64 7x7 one 15.5 -> 11.3 ms on this 2-core
    CPU). A 1x1 kernel reads NCHW well as it is, and so does the forward that makes
    output channels the GEMM rows (conv2d_forward_by_channel: NCHW output, one input
    channel per group, LeNet-5's first layer), which packs no weight either."""
    module, geom = _native.load("_cpu"), geometry(params, x.shape, w.shape)
    r_stride, out_stride = _strides(residual), list(out.stride())
    by_channel = module.conv2d_forward_by_channel(geom, list(x.stride()), out_stride)
    to_channels_last = (w.shape[2] * w.shape[3] > 1 and not by_channel
                        and not x.is_contiguous(memory_format=torch.channels_last))
    n, c, h, width = x.shape
    x_stride = [h * width * c, 1, width * c, c] if to_channels_last else list(x.stride())
    if to_channels_last:  # one channel not dense along W: its copy is, and goes by channel
        by_channel = module.conv2d_forward_by_channel(geom, x_stride, out_stride)
    pack_weight = pack_weight and not by_channel
    w_stride = list(w.stride())
    code, act_code = _native.dtype_code(out), _native.ACT_CODES[act]
    w_key = tuple(w_stride)

    def launch(x, w, bias, residual, out):
        if to_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        packed = packed_conv_weight(w, w_key, geom, code) if pack_weight else None
        module.conv2d_forward(x.data_ptr(), x_stride, w.data_ptr(), w_stride, _ptr(bias), _ptr(residual), r_stride,
                              out.data_ptr(), out_stride, geom, code, act_code, _ptr(packed))
    return launch


def _cuda_conv2d(x, w, bias, residual, out, params, act):
    _native.load("_cuda").conv2d_forward(
        x.data_ptr(), list(x.stride()), w.data_ptr(), list(w.stride()), _ptr(bias), _ptr(residual),
        _strides(residual), out.data_ptr(), list(out.stride()), geometry(params, x.shape, w.shape),
        _native.dtype_code(out), _native.ACT_CODES[act], _native.stream_of(out))


def _triton_conv2d(x, w, bias, residual, out, params, act):
    from fastcnn.triton import conv2d as kernels
    kernels.conv2d_forward(x, w, bias, residual, out, geometry(params, x.shape, w.shape), act,
                           conv_allows_tf32())


FORWARD = backend_table(torch=_torch_conv2d, cpu=_cpu_conv2d, cuda=_cuda_conv2d, triton=_triton_conv2d)


def _bind_forward(backend, x, w, residual, out, params, act, pack_weight):
    """FORWARD[backend] as a launch (x, w, bias, residual, out) for tensors like these;
    pack_weight: the CPU keeps the weight packed between calls."""
    if backend == "cpu":
        return _bind_cpu_conv2d(x, w, residual, out, params, act, pack_weight)
    if backend == "triton":
        from fastcnn.triton import conv2d as kernels
        plan = kernels.forward_launcher(x, w, residual, out, geometry(params, x.shape, w.shape), act)
        tf32 = tf32_reader(x.dtype, conv_allows_tf32)
        return bound_triton(x.device, lambda x, w, bias, residual, out: plan(x, w, bias, residual, out, tf32()))
    launch = FORWARD[backend]
    return lambda x, w, bias, residual, out: launch(x, w, bias, residual, out, params, act)


def _launch_forward(launch, input, weight, bias, residual, out, params, act) -> None:
    if not out.numel():
        return
    launch(input, weight, None if bias is None else bias.contiguous(), residual, out, params, act)


def _new_output(input, weight, params) -> Tensor:
    return new_like(input, output_shape(input, weight, params))


def _run_forward(launch, input, weight, bias, residual, stride, padding, dilation, groups, act) -> Tensor:
    params = check_conv2d(input, weight, bias, residual, stride, padding, dilation, groups, act)
    out = _new_output(input, weight, params)
    _launch_forward(launch, input, weight, bias, residual, out, params, act)
    return out


@direct.custom_op("fastcnn::conv2d", mutates_args=())
def conv2d(input: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor], stride: list[int],
           padding: list[int], dilation: list[int], groups: int, act: Optional[str]) -> Tensor:
    return _run_forward(FORWARD[backends.resolve(input.device)], input, weight, bias, residual, stride, padding,
                        dilation, groups, act)


@conv2d.register_fake
def _(input, weight, bias, residual, stride, padding, dilation, groups, act):
    params = check_conv2d(input, weight, bias, residual, stride, padding, dilation, groups, act)
    return _new_output(input, weight, params)


# --- writing into a channel slice of a larger output (inference: the op mutates `out`)

def check_conv2d_into(out, channel_offset, input, weight, params: ConvParams) -> Tensor:
    """The slice of out the convolution fills, after checking it fits."""
    check_tensor("out", out, ndim=4)
    check_matches("out", out, "input", input, shape=False)
    # An expanded tensor (one element, many places) cannot be written into; vmap has no batching
    # rule for the check, and under a transform the result is copied in (torch's own errors).
    if not direct.transformed() and torch._debug_has_internal_overlap(out) == 1:
        raise ValueError("out must not have overlapping elements (an expanded tensor cannot be written into)")
    if isinstance(channel_offset, bool) or not isinstance(channel_offset, int):
        raise TypeError(f"channel_offset must be an int, got {channel_offset!r}")
    k = weight.shape[0]
    if channel_offset < 0 or channel_offset + k > out.shape[1]:
        raise ValueError(f"channel_offset {channel_offset} + {k} output channels does not fit in out's "
                         f"{out.shape[1]} channels")
    expected = output_shape(input, weight, params)
    got = (out.shape[0], k, *out.shape[2:])
    if got != expected:
        raise ValueError(f"out must have batch and spatial size of the output {expected}, got shape "
                         f"{tuple(out.shape)}")
    return out.narrow(1, channel_offset, k)


@direct.custom_op("fastcnn::conv2d_into", mutates_args=("out",))
def conv2d_into(out: Tensor, channel_offset: int, input: Tensor, weight: Tensor, bias: Optional[Tensor],
                residual: Optional[Tensor], stride: list[int], padding: list[int], dilation: list[int],
                groups: int, act: Optional[str]) -> None:
    params = check_conv2d(input, weight, bias, residual, stride, padding, dilation, groups, act)
    target = check_conv2d_into(out, channel_offset, input, weight, params)
    input, weight, residual = read_apart_from(out, input, weight, residual)
    _launch_forward(FORWARD[backends.resolve(input.device)], input, weight, bias, residual, target, params, act)


def read_apart_from(out: Tensor, *tensors):
    """tensors, each one that shares memory with out replaced by a copy: the kernels
    write out tile by tile while still reading their operands (and Triton's tuning runs
    them more than once), so an operand inside out, such as a residual added in place,
    is read as it was before the call."""
    storage = out.untyped_storage().data_ptr()
    return tuple(_copy_with_strides(t) if t is not None and t.untyped_storage().data_ptr() == storage else t
                 for t in tensors)


def _copy_with_strides(t: Tensor) -> Tensor:
    """A copy with t's own strides, gaps included (clone() makes a slice dense): a
    prepared launcher has them bound. The memory t spans is copied whole and viewed
    with its strides, so an expanded or self-overlapping t (stride 0) copies too."""
    if t.numel() == 0:
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    flat = torch.as_strided(t, (span,), (1,), t.storage_offset()).clone()
    return flat.as_strided(t.shape, t.stride(), 0)


@conv2d_into.register_fake
def _(out, channel_offset, input, weight, bias, residual, stride, padding, dilation, groups, act):
    params = check_conv2d(input, weight, bias, residual, stride, padding, dilation, groups, act)
    check_conv2d_into(out, channel_offset, input, weight, params)


# --- prepared launches (prepared.py): the checks above once per signature

def check_user_padding(padding) -> None:
    """fastcnn.functional.conv2d takes padding as PyTorch does; four ints are the op schema's form."""
    if isinstance(padding, (tuple, list)) and len(padding) not in (1, 2):
        raise TypeError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")


def prepare_conv2d(input, weight, bias, residual, out, stride, padding, dilation, groups, act, channel_offset,
                   pack_weight):
    """A launcher (input, weight, bias, residual, out) -> result for an eager inference
    call of fastcnn.functional.conv2d with 4-D input, or None for the usual path."""
    if input.dim() != 4 or (bias is not None and not bias.is_contiguous()):
        return None
    check_user_padding(padding)
    params = check_conv2d(input, weight, bias, residual, stride, padding, dilation, groups, act)
    backend = backends.resolve(input.device)
    if out is not None:
        target = check_conv2d_into(out, channel_offset, input, weight, params)
        launch = _bind_forward(backend, input, weight, residual, target, params, act, pack_weight)
        channels, nonempty = weight.shape[0], target.numel() > 0

        def run_into(x, w, b, r, o):
            target = o.narrow(1, channel_offset, channels)
            if nonempty:
                x, w, r = read_apart_from(o, x, w, r)
                launch(x, w, b, r, target)
            return target
        return run_into
    if channel_offset != 0:
        return None
    return _allocating_forward(backend, input, weight, residual, params, act, pack_weight)


def _allocating_forward(backend, input, weight, residual, params, act, pack_weight):
    """A launcher (x, w, b, r, *ignored) -> new output, for tensors like these."""
    shape, fmt = output_shape(input, weight, params), memory_format_of(input)
    like_out = torch.empty(shape, dtype=input.dtype, device="meta", memory_format=fmt)
    launch = _bind_forward(backend, input, weight, residual, like_out, params, act, pack_weight)
    nonempty = all(shape)

    def run(x, w, b, r, *_):
        y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        if nonempty:
            launch(x, w, b, r, y)
        return y
    return run


def _prepare_conv2d_op(input, weight, bias, residual, stride, padding, dilation, groups, act):
    """fastcnn::conv2d's body for arguments with this signature (direct.register_prepare)."""
    if bias is not None and not bias.is_contiguous():
        return None
    params = check_conv2d(input, weight, bias, residual, stride, padding, dilation, groups, act)
    return _allocating_forward(backends.resolve(input.device), input, weight, residual, params, act, False)


def prepare_conv2d_grad(input, weight, bias, residual, out, stride, padding, dilation, groups, act, channel_offset,
                        pack_weight):
    """A launcher for a call of fastcnn.functional.conv2d that autograd records (4-D
    input, no out): fastcnn::conv2d's Function over its prepared body."""
    if input.dim() != 4 or out is not None or channel_offset != 0:
        return None
    check_user_padding(padding)
    params = check_conv2d(input, weight, bias, residual, stride, padding, dilation, groups, act)
    options = (*params.as_lists(), act)
    run = _prepare_conv2d_op(input, weight, bias, residual, *options)
    if run is None:
        return None
    return lambda x, w, b, r, o: direct.apply("fastcnn::conv2d", run, x, w, b, r, *options)


# --- input gradient: grad_input = conv_transpose(grad_pre, weight), as a gather

def _check_size(name: str, size) -> None:
    if len(size) != 4 or any(s < 0 for s in size):
        raise ValueError(f"{name} must be 4 non-negative sizes, got {list(size)}")


def check_conv2d_input_grad(grad, weight, input_size, stride, padding, dilation, groups) -> ConvParams:
    check_tensor("grad", grad, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_matches("weight", weight, "grad", grad, shape=False)
    _check_size("input_size", input_size)
    return _check_backward_shapes(grad, torch.empty(input_size, device="meta"), weight, stride, padding, dilation,
                                  groups)


def _check_backward_shapes(grad, input, weight, stride, padding, dilation, groups) -> ConvParams:
    params = conv_params(input, weight, stride, padding, dilation, groups)
    expected = output_shape(input, weight, params)
    if tuple(grad.shape) != expected:
        raise ValueError(f"grad must have the output's shape {expected}, got {tuple(grad.shape)}")
    return params


def _torch_conv2d_input_grad(grad, w, grad_x, params: ConvParams):
    acc = acc_dtype(grad_x.dtype)
    top, left, bottom, right = params.padding
    n, c, h, wd = grad_x.shape
    padded = torch.empty((n, c, h + top + bottom, wd + left + right), dtype=acc, device=grad_x.device)
    gx = torch.ops.aten.convolution_backward(
        grad.to(acc), padded, w.to(acc), None, list(params.stride), [0, 0], list(params.dilation), False, [0, 0],
        params.groups, [True, False, False])[0]
    grad_x.copy_(gx[:, :, top:top + h, left:left + wd])


def _cpu_conv2d_input_grad(grad, w, grad_x, params):
    _native.load("_cpu").conv2d_input_grad(
        grad.data_ptr(), list(grad.stride()), w.data_ptr(), list(w.stride()), grad_x.data_ptr(),
        list(grad_x.stride()), geometry(params, grad_x.shape, w.shape), _native.dtype_code(grad_x))


def _cuda_conv2d_input_grad(grad, w, grad_x, params):
    _native.load("_cuda").conv2d_input_grad(
        grad.data_ptr(), list(grad.stride()), w.data_ptr(), list(w.stride()), grad_x.data_ptr(),
        list(grad_x.stride()), geometry(params, grad_x.shape, w.shape), _native.dtype_code(grad_x),
        _native.stream_of(grad_x))


def _triton_conv2d_input_grad(grad, w, grad_x, params):
    from fastcnn.triton import conv2d as kernels
    kernels.conv2d_input_grad(grad, w, grad_x, geometry(params, grad_x.shape, w.shape),
                              conv_allows_tf32())


INPUT_GRAD = backend_table(torch=_torch_conv2d_input_grad, cpu=_cpu_conv2d_input_grad,
                           cuda=_cuda_conv2d_input_grad, triton=_triton_conv2d_input_grad)


def _run_input_grad(launch, grad, weight, input_size, stride, padding, dilation, groups) -> Tensor:
    params = check_conv2d_input_grad(grad, weight, input_size, stride, padding, dilation, groups)
    grad_x = new_like(grad, input_size)
    if grad_x.numel():
        if grad.numel() and weight.numel():
            launch(grad, weight, grad_x, params)
        else:  # nothing reaches the input
            grad_x.zero_()
    return grad_x


@direct.custom_op("fastcnn::conv2d_input_grad", mutates_args=())
def conv2d_input_grad(grad: Tensor, weight: Tensor, input_size: list[int], stride: list[int], padding: list[int],
                      dilation: list[int], groups: int) -> Tensor:
    return _run_input_grad(INPUT_GRAD[backends.resolve(grad.device)], grad, weight, input_size, stride, padding,
                           dilation, groups)


def _prepare_input_grad(grad, weight, input_size, stride, padding, dilation, groups):
    """fastcnn::conv2d_input_grad's body for arguments with this signature."""
    params = check_conv2d_input_grad(grad, weight, input_size, stride, padding, dilation, groups)
    if not (grad.numel() and weight.numel()):
        return None
    backend = backends.resolve(grad.device)
    if backend == "cpu":
        launch = _bind_cpu_backward("conv2d_input_grad", grad, weight, input_size, memory_format_of(grad), params)
    elif backend == "triton":
        launch = _bind_triton_backward("conv2d_input_grad", grad, weight, input_size, memory_format_of(grad), params)
    else:
        launch = _bind_backward(INPUT_GRAD[backend], params)
    run = prepared.allocating(input_size, launch, like=grad)
    return lambda g, w, *_: run(g, w)


def _bind_backward(grad_op, params):
    """A gradient launch (grad, other, out) of a backend's launcher with params bound."""
    def launch(g, o, out):
        grad_op(g, o, out, params)
    return launch


def _gradient_geometry(kernel: str, params, out_size, other_shape) -> list[int]:
    """The geometry of a gradient op: its output is the image (input gradient) or the
    kernel (weight gradient), the other operand the weight or the input."""
    image, kernel_shape = (out_size, other_shape) if kernel == "conv2d_input_grad" else (other_shape, out_size)
    return geometry(params, image, kernel_shape)


def _bind_cpu_backward(kernel: str, grad, other, out_size, out_format, params):
    """A CPU gradient launch (grad, other, out) with geometry, strides and dtype bound
    (other: the weight for the input gradient, the input for the weight gradient)."""
    module = _native.load("_cpu")
    geom, code = _gradient_geometry(kernel, params, out_size, other.shape), _native.DTYPE_CODES[grad.dtype]
    g_stride, o_stride = list(grad.stride()), list(other.stride())
    out_stride = list(torch.empty(out_size, device="meta", memory_format=out_format).stride())
    native = getattr(module, kernel)

    def launch(g, o, out):
        native(g.data_ptr(), g_stride, o.data_ptr(), o_stride, out.data_ptr(), out_stride, geom, code)
    return launch


def _bind_triton_backward(kernel: str, grad, other, out_size, out_format, params):
    """A Triton gradient launch (grad, other, out), planned once for tensors like these
    (fastcnn/triton/conv2d.py's *_launcher; arguments as _bind_cpu_backward's)."""
    from fastcnn.triton import conv2d as kernels
    like_out = torch.empty(out_size, dtype=grad.dtype, device="meta", memory_format=out_format)
    make = kernels.input_grad_launcher if kernel == "conv2d_input_grad" else kernels.weight_grad_launcher
    plan = make(grad, other, like_out, _gradient_geometry(kernel, params, out_size, other.shape))
    tf32 = tf32_reader(grad.dtype, conv_allows_tf32)
    return bound_triton(grad.device, lambda g, o, out: plan(g, o, out, tf32()))


direct.register_prepare("fastcnn::conv2d_input_grad", _prepare_input_grad)


@conv2d_input_grad.register_fake
def _(grad, weight, input_size, stride, padding, dilation, groups):
    check_conv2d_input_grad(grad, weight, input_size, stride, padding, dilation, groups)
    return new_like(grad, input_size)


# --- weight gradient: a reduction over N·OH·OW, in an order fixed by the shape

def check_conv2d_weight_grad(grad, input, weight_size, stride, padding, dilation, groups) -> ConvParams:
    check_tensor("grad", grad, ndim=4)
    check_tensor("input", input, ndim=4)
    check_matches("input", input, "grad", grad, shape=False)
    _check_size("weight_size", weight_size)
    return _check_backward_shapes(grad, input, torch.empty(weight_size, device="meta"), stride, padding, dilation,
                                  groups)


def _torch_conv2d_weight_grad(grad, x, grad_w, params: ConvParams):
    acc = acc_dtype(grad_w.dtype)
    xp, pad = _padded_for_torch(x.to(acc), params)
    weight = torch.empty(grad_w.shape, dtype=acc, device=grad_w.device)
    gw = torch.ops.aten.convolution_backward(
        grad.to(acc), xp, weight, None, list(params.stride), pad, list(params.dilation), False, [0, 0],
        params.groups, [False, True, False])[1]
    grad_w.copy_(gw)


def _cpu_conv2d_weight_grad(grad, x, grad_w, params):
    _native.load("_cpu").conv2d_weight_grad(
        grad.data_ptr(), list(grad.stride()), x.data_ptr(), list(x.stride()), grad_w.data_ptr(),
        list(grad_w.stride()), geometry(params, x.shape, grad_w.shape), _native.dtype_code(grad_w))


def _cuda_conv2d_weight_grad(grad, x, grad_w, params):
    module = _native.load("_cuda")
    geom = geometry(params, x.shape, grad_w.shape)
    code = _native.dtype_code(grad_w)
    workspace = torch.empty(module.conv2d_weight_grad_workspace(geom, code), dtype=acc_dtype(grad_w.dtype),
                            device=grad_w.device)
    module.conv2d_weight_grad(grad.data_ptr(), list(grad.stride()), x.data_ptr(), list(x.stride()),
                              grad_w.data_ptr(), list(grad_w.stride()), workspace.data_ptr(), geom, code,
                              _native.stream_of(grad_w))


def _triton_conv2d_weight_grad(grad, x, grad_w, params):
    from fastcnn.triton import conv2d as kernels
    kernels.conv2d_weight_grad(grad, x, grad_w, geometry(params, x.shape, grad_w.shape),
                               conv_allows_tf32())


WEIGHT_GRAD = backend_table(torch=_torch_conv2d_weight_grad, cpu=_cpu_conv2d_weight_grad,
                            cuda=_cuda_conv2d_weight_grad, triton=_triton_conv2d_weight_grad)


def _weight_grad_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _new_weight_grad(grad, weight_size, channels_last: bool) -> Tensor:
    return torch.empty(weight_size, dtype=grad.dtype, device=grad.device,
                       memory_format=_weight_grad_format(channels_last))


def _run_weight_grad(launch, grad, input, weight_size, stride, padding, dilation, groups,
                     channels_last) -> Tensor:
    params = check_conv2d_weight_grad(grad, input, weight_size, stride, padding, dilation, groups)
    grad_w = _new_weight_grad(grad, weight_size, channels_last)
    if grad_w.numel():
        if grad.numel():
            launch(grad, input, grad_w, params)
        else:  # an empty batch: the sum over no terms
            grad_w.zero_()
    return grad_w


@direct.custom_op("fastcnn::conv2d_weight_grad", mutates_args=())
def conv2d_weight_grad(grad: Tensor, input: Tensor, weight_size: list[int], stride: list[int], padding: list[int],
                       dilation: list[int], groups: int, channels_last: bool = False) -> Tensor:
    """The weight gradient, in channels_last when `channels_last` (a channels_last
    weight's: its parameter then takes it as it is, and the CPU kernel writes its
    (r, s, c) columns in order), else contiguous."""
    return _run_weight_grad(WEIGHT_GRAD[backends.resolve(grad.device)], grad, input, weight_size, stride, padding,
                            dilation, groups, channels_last)


def _prepare_weight_grad(grad, input, weight_size, stride, padding, dilation, groups, channels_last=False):
    """fastcnn::conv2d_weight_grad's body for arguments with this signature."""
    params = check_conv2d_weight_grad(grad, input, weight_size, stride, padding, dilation, groups)
    if not grad.numel():
        return None
    backend = backends.resolve(grad.device)
    out_format = _weight_grad_format(channels_last)
    if backend == "cpu":
        launch = _bind_cpu_backward("conv2d_weight_grad", grad, input, weight_size, out_format, params)
    elif backend == "triton":
        launch = _bind_triton_backward("conv2d_weight_grad", grad, input, weight_size, out_format, params)
    else:
        launch = _bind_backward(WEIGHT_GRAD[backend], params)
    run = prepared.allocating(weight_size, launch, memory_format=out_format)
    return lambda g, x, *_: run(g, x)


direct.register_prepare("fastcnn::conv2d_weight_grad", _prepare_weight_grad)


@conv2d_weight_grad.register_fake
def _(grad, input, weight_size, stride, padding, dilation, groups, channels_last=False):
    check_conv2d_weight_grad(grad, input, weight_size, stride, padding, dilation, groups)
    return _new_weight_grad(grad, weight_size, channels_last)


# --- autograd

def _channels_last_weight(weight: Tensor) -> bool:
    """Whether the weight gradient comes back channels_last (conv2d_weight_grad's flag):
    in a channels_last weight's layout, AccumulateGrad would copy a contiguous gradient
    into it (17 kxk weights in a ResNet-50 step), and the CPU kernel writes that layout
    without reordering its rows."""
    return not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def _setup_context(ctx, inputs, output):
    input, weight, bias, residual, stride, padding, dilation, groups, act = inputs
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.act = act
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.input_shape = list(input.shape)
    ctx.weight_shape = list(weight.shape)
    ctx.weight_channels_last = _channels_last_weight(weight)
    # The activation's gradient is taken from the output; without one it is not needed.
    ctx.save_for_backward(input, weight, output if act is not None else None)


def pre_activation_grad(grad: Tensor, out: Optional[Tensor], act, has_bias: bool):
    """(gradient before the activation, bias gradient or None), in one fastcnn pass when needed."""
    if act is None and not has_bias:
        return grad, None
    if act is None:
        out = grad  # only its shape and layout matter to bias_act_backward without an activation
    grad_pre, grad_bias = direct.call("fastcnn::bias_act_backward", grad, out, act)
    return grad_pre, grad_bias if has_bias else None


def _backward(ctx, grad):
    input, weight, out = ctx.saved_tensors
    grad_pre, grad_bias = pre_activation_grad(grad, out, ctx.act, ctx.has_bias and ctx.needs_input_grad[2])
    grad_input = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_input = direct.call("fastcnn::conv2d_input_grad", grad_pre, weight, ctx.input_shape, *ctx.conv)
    if ctx.needs_input_grad[1]:
        grad_weight = direct.call("fastcnn::conv2d_weight_grad", grad_pre, input, ctx.weight_shape, *ctx.conv,
                                  ctx.weight_channels_last)
    grad_residual = grad_pre if ctx.has_residual else None
    return grad_input, grad_weight, grad_bias, grad_residual, None, None, None, None, None


direct.register_autograd(conv2d, "fastcnn::conv2d", _backward, _setup_context)


# The gradient ops' own gradients (a double backward): both are bilinear, in (grad,
# weight) and in (grad, input), so each derivative is one of the three convolutions.

def _setup_input_grad_context(ctx, inputs, output):
    grad, weight, input_size, *conv = inputs
    ctx.conv = conv
    ctx.weight_shape = list(weight.shape)
    ctx.weight_channels_last = _channels_last_weight(weight)
    ctx.save_for_backward(grad, weight)


def _input_grad_backward(ctx, grad_grad_x):
    grad, weight = ctx.saved_tensors
    d_grad = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad = direct.call("fastcnn::conv2d", grad_grad_x, weight, None, None, *ctx.conv, None)
    if ctx.needs_input_grad[1]:
        d_weight = direct.call("fastcnn::conv2d_weight_grad", grad, grad_grad_x, ctx.weight_shape, *ctx.conv,
                               ctx.weight_channels_last)
    return d_grad, d_weight, None, None, None, None, None


def _setup_weight_grad_context(ctx, inputs, output):
    grad, input, weight_size, *conv, channels_last = inputs
    ctx.conv = conv
    ctx.input_shape = list(input.shape)
    ctx.save_for_backward(grad, input)


def _weight_grad_backward(ctx, grad_grad_w):
    grad, input = ctx.saved_tensors
    d_grad = d_input = None
    if ctx.needs_input_grad[0]:
        d_grad = direct.call("fastcnn::conv2d", input, grad_grad_w, None, None, *ctx.conv, None)
    if ctx.needs_input_grad[1]:
        d_input = direct.call("fastcnn::conv2d_input_grad", grad, grad_grad_w, ctx.input_shape, *ctx.conv)
    return d_grad, d_input, None, None, None, None, None, None


conv2d_input_grad.register_autograd(_input_grad_backward, setup_context=_setup_input_grad_context)
conv2d_weight_grad.register_autograd(_weight_grad_backward, setup_context=_setup_weight_grad_context)
autocast.register("fastcnn::conv2d", autocast.LOWER)
autocast.register("fastcnn::conv2d_into", autocast.LOWER, out=0)  # out keeps its dtype, and sets the operands'
direct.register_prepare("fastcnn::conv2d", _prepare_conv2d_op)


# --- Triton twins that torch.compile traces into (see triton_route.py)

@torch.library.triton_op("fastcnn::conv2d_triton", mutates_args=())
def conv2d_triton(input: Tensor, weight: Tensor, bias: Optional[Tensor], residual: Optional[Tensor],
                  stride: list[int], padding: list[int], dilation: list[int], groups: int,
                  act: Optional[str]) -> Tensor:
    return _run_forward(_triton_conv2d, input, weight, bias, residual, stride, padding, dilation, groups, act)


@torch.library.triton_op("fastcnn::conv2d_input_grad_triton", mutates_args=())
def conv2d_input_grad_triton(grad: Tensor, weight: Tensor, input_size: list[int], stride: list[int],
                             padding: list[int], dilation: list[int], groups: int) -> Tensor:
    return _run_input_grad(_triton_conv2d_input_grad, grad, weight, input_size, stride, padding, dilation, groups)


@torch.library.triton_op("fastcnn::conv2d_weight_grad_triton", mutates_args=())
def conv2d_weight_grad_triton(grad: Tensor, input: Tensor, weight_size: list[int], stride: list[int],
                              padding: list[int], dilation: list[int], groups: int,
                              channels_last: bool = False) -> Tensor:
    return _run_weight_grad(_triton_conv2d_weight_grad, grad, input, weight_size, stride, padding, dilation,
                            groups, channels_last)


route_to_triton_when_compiled(conv2d, conv2d_triton)
route_to_triton_when_compiled(conv2d_input_grad, conv2d_input_grad_triton)
route_to_triton_when_compiled(conv2d_weight_grad, conv2d_weight_grad_triton)

direct.register_reference("fastcnn::conv2d", reference_conv2d)
