"""fastcnn::local_response_norm: AlexNet's local response normalisation across channels,
as torch.nn.functional.local_response_norm computes it for (N, C, H, W) input:

    s[c] = k + alpha / size * sum of x[c']^2 for c' in [c - size//2, c + (size-1)//2] within [0, C)
    y[c] = x[c] / s[c]^beta

(PyTorch pads the channel window with zeros and always divides by `size`.) The
output is in input's layout. Backward: fastcnn::local_response_norm_backward
recomputes s from the saved input (no second tensor is kept):

    grad_x[j] = g[j] / s[j]^beta - 2 alpha beta / size * x[j] * sum over c in
                [j - (size-1)//2, j + size//2] of g[c] x[c] / s[c]^(beta+1)
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as torch_F
from torch import Tensor

from fastcnn import _native, backends
from fastcnn.ops.checks import check_matches, check_tensor
from fastcnn.ops.launch import backend_table
from fastcnn.ops.layout import dense_in, memory_format_of, new_like
from fastcnn.ops.triton_route import route_to_triton_when_compiled
from fastcnn.ops import autocast, direct
from fastcnn.ops.precision import acc_dtype


def check_lrn_params(size, alpha, beta, k) -> None:
    if type(size) is not int:
        raise TypeError(f"size must be an int, got {type(size).__name__}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    for name, value in (("alpha", alpha), ("beta", beta), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def check_local_response_norm(input, size, alpha, beta, k) -> None:
    check_tensor("input", input, ndim=4)
    check_lrn_params(size, alpha, beta, k)



def channel_stride(t: Tensor) -> int:
    """The channel stride of a tensor dense in its layout: 1 (channels_last) or H*W."""
    return 1 if memory_format_of(t) == torch.channels_last else t.shape[2] * t.shape[3]


def _cpu_shape(t: Tensor) -> tuple:
    n, c, h, w = t.shape
    return n, c, h * w, memory_format_of(t) == torch.channels_last


def _window_sum(t: Tensor, size: int, front: int, back: int) -> Tensor:
    """Sum over channels [c - front, c + back] of (N, C, H, W) t, zero-padded, in PyTorch's
    own way (avg_pool3d over the padded channels, times size)."""
    n, c, h, w = t.shape
    padded = torch_F.pad(t.reshape(n, 1, c, h, w), (0, 0, 0, 0, front, back))
    return torch_F.avg_pool3d(padded, (size, 1, 1), stride=1).reshape(n, c, h, w) * size


# --- forward kernels, one per backend: (x, out, size, alpha, beta, k), x dense in out's layout

def _torch_lrn(x, out, size, alpha, beta, k):
    # Computed in float32 (float64) and rounded once, as the kernels do.
    out.copy_(torch_F.local_response_norm(x.to(acc_dtype(x.dtype)), size, alpha, beta, k))


def reference_local_response_norm(input, size, alpha=1e-4, beta=0.75, k=1.0) -> Tensor:
    """fastcnn::local_response_norm in PyTorch ops, for torch.func transforms
    (direct.register_reference)."""
    check_local_response_norm(input, size, alpha, beta, k)
    return torch_F.local_response_norm(input.to(acc_dtype(input.dtype)), size, alpha, beta, k).to(input.dtype)


def _cpu_lrn(x, out, size, alpha, beta, k):
    _native.load("_cpu").local_response_norm(x.data_ptr(), out.data_ptr(), *_cpu_shape(out), size, alpha, beta,
                                             k, _native.dtype_code(out))


def _cuda_lrn(x, out, size, alpha, beta, k):
    _native.load("_cuda").local_response_norm(x.data_ptr(), out.data_ptr(), out.numel(), out.shape[1],
                                              channel_stride(out), size, alpha, beta, k, _native.dtype_code(out),
                                              _native.stream_of(out))


def _triton_lrn(x, out, size, alpha, beta, k):
    from fastcnn.triton import local_response_norm as kernels
    kernels.local_response_norm(x, out, channel_stride(out), size, alpha, beta, k)


FORWARD = backend_table(torch=_torch_lrn, cpu=_cpu_lrn, cuda=_cuda_lrn, triton=_triton_lrn)


def _forward(launch, input: Tensor, size, alpha, beta, k) -> Tensor:
    check_local_response_norm(input, size, alpha, beta, k)
    out = new_like(input)
    if out.numel():
        launch(dense_in(input, memory_format_of(out)), out, size, float(alpha), float(beta), float(k))
    return out


@direct.custom_op("fastcnn::local_response_norm", mutates_args=())
def local_response_norm(input: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0) -> Tensor:
    return _forward(FORWARD[backends.resolve(input.device)], input, size, alpha, beta, k)


@local_response_norm.register_fake
def _(input, size, alpha=1e-4, beta=0.75, k=1.0):
    check_local_response_norm(input, size, alpha, beta, k)
    return new_like(input)


# --- backward kernels: (grad, x, grad_x, size, alpha, beta, k), grad and x dense in grad_x's layout

def _torch_lrn_backward(grad, x, grad_x, size, alpha, beta, k):
    acc = acc_dtype(x.dtype)
    x, grad = x.to(acc), grad.to(acc)
    s = _window_sum(x * x, size, size // 2, (size - 1) // 2) * (alpha / size) + k
    div = s.pow(beta)
    terms = grad * x / (div * s)
    grad_x.copy_(grad / div - (2 * alpha * beta / size) * x * _window_sum(terms, size, (size - 1) // 2, size // 2))


def _cpu_lrn_backward(grad, x, grad_x, size, alpha, beta, k):
    _native.load("_cpu").local_response_norm_backward(grad.data_ptr(), x.data_ptr(), grad_x.data_ptr(),
                                                      *_cpu_shape(grad_x), size, alpha, beta, k,
                                                      _native.dtype_code(grad_x))


def _cuda_lrn_backward(grad, x, grad_x, size, alpha, beta, k):
    scratch = torch.empty_like(grad_x, dtype=acc_dtype(grad_x.dtype))
    _native.load("_cuda").local_response_norm_backward(grad.data_ptr(), x.data_ptr(), scratch.data_ptr(),
                                                       grad_x.data_ptr(), grad_x.numel(), grad_x.shape[1],
                                                       channel_stride(grad_x), size, alpha, beta, k,
                                                       _native.dtype_code(grad_x), _native.stream_of(grad_x))


def _triton_lrn_backward(grad, x, grad_x, size, alpha, beta, k):
    from fastcnn.triton import local_response_norm as kernels
    kernels.local_response_norm_backward(grad, x, grad_x, channel_stride(grad_x), size, alpha, beta, k)


BACKWARD = backend_table(torch=_torch_lrn_backward, cpu=_cpu_lrn_backward, cuda=_cuda_lrn_backward,
                         triton=_triton_lrn_backward)


def check_local_response_norm_backward(grad_output, input, size, alpha, beta, k) -> None:
    check_local_response_norm(input, size, alpha, beta, k)
    check_tensor("grad_output", grad_output, ndim=4)
    check_matches("grad_output", grad_output, "input", input)


def _backward_op(launch, grad_output: Tensor, input: Tensor, size, alpha, beta, k) -> Tensor:
    check_local_response_norm_backward(grad_output, input, size, alpha, beta, k)
    grad_in = new_like(input)
    if grad_in.numel():
        fmt = memory_format_of(grad_in)
        launch(dense_in(grad_output, fmt), dense_in(input, fmt), grad_in, size, float(alpha), float(beta),
               float(k))
    return grad_in


@direct.custom_op("fastcnn::local_response_norm_backward", mutates_args=())
def local_response_norm_backward(grad_output: Tensor, input: Tensor, size: int, alpha: float, beta: float,
                                 k: float) -> Tensor:
    return _backward_op(BACKWARD[backends.resolve(input.device)], grad_output, input, size, alpha, beta, k)


@local_response_norm_backward.register_fake
def _(grad_output, input, size, alpha, beta, k):
    check_local_response_norm_backward(grad_output, input, size, alpha, beta, k)
    return new_like(input)


def _setup_context(ctx, inputs, output):
    input, *ctx.params = inputs
    ctx.save_for_backward(input)


def _backward(ctx, grad):
    (input,) = ctx.saved_tensors
    return direct.call("fastcnn::local_response_norm_backward", grad, input, *ctx.params), None, None, None, None


direct.register_autograd(local_response_norm, "fastcnn::local_response_norm", _backward, _setup_context)


def _setup_backward_context(ctx, inputs, output):
    grad_output, input, *ctx.params = inputs
    ctx.save_for_backward(grad_output, input)


def _backward_backward(ctx, grad_grad_input):
    """local_response_norm_backward's own gradients, from torch's LRN differentiated
    twice (a double backward is rare; its formula is long). Where a further derivative
    will be taken (grad mode on here), the results keep their graph back to the
    gradient and the input, so third and higher orders come out right too."""
    grad_output, input = ctx.saved_tensors
    higher = torch.is_grad_enabled()
    with torch.enable_grad():
        # Local aliases to differentiate with respect to: the gradient may itself depend
        # on the input through the outer graph, whose saved tensors are gone.
        g, x = (t.view_as(t) if t.requires_grad else t.detach().requires_grad_() for t in (grad_output, input))
        (grad_x,) = torch.autograd.grad(torch_F.local_response_norm(x, *ctx.params), x, g, create_graph=True)
        d_grad_output, d_input = torch.autograd.grad(grad_x, (g, x), grad_grad_input, create_graph=higher)
    return d_grad_output, d_input, None, None, None, None


local_response_norm_backward.register_autograd(_backward_backward, setup_context=_setup_backward_context)
autocast.register("fastcnn::local_response_norm", autocast.FLOAT32)


# --- Triton twins that torch.compile traces into (see triton_route.py)

@torch.library.triton_op("fastcnn::local_response_norm_triton", mutates_args=())
def local_response_norm_triton(input: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75,
                               k: float = 1.0) -> Tensor:
    return _forward(_triton_lrn, input, size, alpha, beta, k)


@torch.library.triton_op("fastcnn::local_response_norm_backward_triton", mutates_args=())
def local_response_norm_backward_triton(grad_output: Tensor, input: Tensor, size: int, alpha: float, beta: float,
                                        k: float) -> Tensor:
    return _backward_op(_triton_lrn_backward, grad_output, input, size, alpha, beta, k)


route_to_triton_when_compiled(local_response_norm, local_response_norm_triton)
route_to_triton_when_compiled(local_response_norm_backward, local_response_norm_backward_triton)

direct.register_reference("fastcnn::local_response_norm", reference_local_response_norm)
