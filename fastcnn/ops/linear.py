"""fastcnn::linear: a fully connected layer as one GEMM with a fused epilogue,

    out = act(input @ weight.T + bias)

input (..., in_features), weight (out_features, in_features) as torch.nn.Linear
keeps it. The kernels take every operand with its strides, so the backward is
made of the same op on transposed views, with no copies:

    grad_pre, grad_bias = fastcnn::bias_act_backward(grad, out, act)
    grad_input  = linear(grad_pre, weight.T)        (M x N) @ (N x K)
    grad_weight = linear(grad_pre.T, input.T)       (N x M) @ (M x K): a reduction
                                                     over the batch, in a fixed order
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcnn import _native, backends
from fastcnn.ops.checks import check_act, check_layer_bias, check_matches, check_tensor
from fastcnn.ops.conv2d import pre_activation_grad, torch_act
from fastcnn.ops.launch import backend_table, bound_triton
from fastcnn.ops.precision import acc_dtype, matmul_allows_tf32, tf32_reader
from fastcnn.ops.triton_route import route_to_triton_when_compiled
from fastcnn.ops import autocast, direct, prepared

ACTS = (None, "relu", "tanh", "sigmoid")


def check_linear(input, weight, bias, act) -> None:
    check_tensor("input", input, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    check_matches("weight", weight, "input", input, shape=False)
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input's last dimension {input.shape[-1]} does not match weight.shape[1] = "
                         f"{weight.shape[1]} (weight is (out_features, in_features))")
    check_layer_bias(bias, input, weight)
    check_act(act, ACTS)


# --- kernels, one per backend: (a [M, K], b [N, K], bias [N] or None, out [M, N], act), any strides

def _linear_values(a, b, bias, act, acc: torch.dtype) -> Tensor:
    """In `acc`, the output's accumulation dtype, as the kernels compute it."""
    return torch_act(F.linear(a.to(acc), b.to(acc), None if bias is None else bias.to(acc)), act)


def _torch_linear(a, b, bias, out, act):
    out.copy_(_linear_values(a, b, bias, act, acc_dtype(out.dtype)))


def reference_linear(input, weight, bias, act) -> Tensor:
    """fastcnn::linear in PyTorch ops, for torch.func transforms (direct.register_reference)."""
    check_linear(input, weight, bias, act)
    return _linear_values(input, weight, bias, act, acc_dtype(input.dtype)).to(input.dtype)


def _cpu_linear(a, b, bias, out, act):
    (m, k), n = a.shape, b.shape[0]
    _native.load("_cpu").linear(a.data_ptr(), *a.stride(), b.data_ptr(), *b.stride(),
                                0 if bias is None else bias.data_ptr(), out.data_ptr(), *out.stride(), m, n, k,
                                _native.dtype_code(out), _native.ACT_CODES[act])


def _cuda_linear(a, b, bias, out, act):
    (m, k), n = a.shape, b.shape[0]
    module = _native.load("_cuda")
    code = _native.dtype_code(out)
    workspace = torch.empty(module.linear_workspace(m, n, k, code), dtype=acc_dtype(out.dtype), device=out.device)
    module.linear(a.data_ptr(), *a.stride(), b.data_ptr(), *b.stride(), 0 if bias is None else bias.data_ptr(),
                  out.data_ptr(), *out.stride(), workspace.data_ptr(), m, n, k, code, _native.ACT_CODES[act],
                  _native.stream_of(out))


def _triton_linear(a, b, bias, out, act):
    from fastcnn.triton import linear as kernels
    kernels.linear(a, b, bias, out, act, matmul_allows_tf32())


FORWARD = backend_table(torch=_torch_linear, cpu=_cpu_linear, cuda=_cuda_linear, triton=_triton_linear)


def _output_shape(input, weight) -> list[int]:
    return [*input.shape[:-1], weight.shape[0]]


def _run_forward(launch, input, weight, bias, act) -> Tensor:
    check_linear(input, weight, bias, act)
    out = input.new_empty(_output_shape(input, weight))
    if out.numel():
        (n, k), m = weight.shape, math.prod(input.shape[:-1])
        a = input.reshape(m, k)  # a view whenever the leading dims allow one
        bias = None if bias is None else bias.contiguous()
        # An empty reduction (no input features) leaves only the epilogue.
        run = launch if k else _torch_linear
        run(a, weight, bias, out.view(m, n), act)
    return out


@direct.custom_op("fastcnn::linear", mutates_args=())
def linear(input: Tensor, weight: Tensor, bias: Optional[Tensor], act: Optional[str]) -> Tensor:
    return _run_forward(FORWARD[backends.resolve(input.device)], input, weight, bias, act)


def prepare_linear(input, weight, bias, act):
    """A launcher (input, weight, bias) -> output for an eager inference call of
    fastcnn.functional.linear (prepared.py)."""
    if (bias is not None and not bias.is_contiguous()) or input.shape[-1] == 0:
        return None
    check_linear(input, weight, bias, act)
    backend = backends.resolve(input.device)
    (n, k), m = weight.shape, math.prod(input.shape[:-1])
    shape = _output_shape(input, weight)
    if backend == "cpu" and input.dim() == 2 and m and n:  # 2-D: the strides are the input's own
        return _bind_cpu_linear(input.stride(), weight.stride(), m, n, k, shape, input.dtype, act)
    if backend == "triton" and m and n:
        from fastcnn.triton import linear as kernels
        like_out = torch.empty(m, n, dtype=input.dtype, device="meta")
        plan = kernels.linear_launcher(input.reshape(m, k), weight, like_out, act)
        tf32 = tf32_reader(input.dtype, matmul_allows_tf32)
        launch = bound_triton(input.device, lambda a, w, b, out: plan(a, w, b, out, tf32()))
        return prepared.allocating(shape, lambda x, w, b, out: launch(x.reshape(m, k), w, b, out.view(m, n)))
    launch = FORWARD[backend]
    return prepared.allocating(shape, lambda x, w, b, out: launch(x.reshape(m, k), w, b, out.view(m, n), act))


def _bind_cpu_linear(a_stride, w_stride, m, n, k, shape, dtype, act):
    """The CPU launch with sizes, strides and codes bound: a prepared call only reads
    pointers (a batch-1 FC call's own Python costs more than its kernel)."""
    module, code, act_code = _native.load("_cpu"), _native.DTYPE_CODES[dtype], _native.ACT_CODES[act]
    (as0, as1), (ws0, ws1) = a_stride, w_stride

    def run(x, w, b):
        out = torch.empty(shape, dtype=x.dtype, device=x.device)
        module.linear(x.data_ptr(), as0, as1, w.data_ptr(), ws0, ws1, 0 if b is None else b.data_ptr(),
                      out.data_ptr(), n, 1, m, n, k, code, act_code)
        return out
    return run


def _prepare_linear_op(input, weight, bias, act):
    """fastcnn::linear's body for arguments with this signature (direct.register_prepare)."""
    run = prepare_linear(input, weight, bias, act)
    return None if run is None else lambda x, w, b, _: run(x, w, b)


def prepare_linear_grad(input, weight, bias, act):
    """A launcher for a call of fastcnn.functional.linear that autograd records:
    fastcnn::linear's Function over its prepared body."""
    run = _prepare_linear_op(input, weight, bias, act)
    return None if run is None else lambda x, w, b: direct.apply("fastcnn::linear", run, x, w, b, act)


direct.register_prepare("fastcnn::linear", _prepare_linear_op)


@linear.register_fake
def _(input, weight, bias, act):
    check_linear(input, weight, bias, act)
    return input.new_empty(_output_shape(input, weight))


def _setup_context(ctx, inputs, output):
    input, weight, bias, act = inputs
    ctx.act = act
    ctx.has_bias = bias is not None
    ctx.save_for_backward(input, weight, output if act is not None else None)


def _backward(ctx, grad):
    input, weight, out = ctx.saved_tensors
    (n, k), m = weight.shape, math.prod(input.shape[:-1])
    grad2 = grad.reshape(m, n)
    out2 = None if out is None else out.reshape(m, n)
    grad_pre, grad_bias = pre_activation_grad(grad2, out2, ctx.act, ctx.has_bias and ctx.needs_input_grad[2])
    grad_input = grad_weight = None
    if ctx.needs_input_grad[0]:
        grad_input = direct.call("fastcnn::linear", grad_pre, weight.t(), None, None).view(input.shape)
    if ctx.needs_input_grad[1]:
        grad_weight = direct.call("fastcnn::linear", grad_pre.t(), input.reshape(m, k).t(), None, None)
    return grad_input, grad_weight, grad_bias, None


direct.register_autograd(linear, "fastcnn::linear", _backward, _setup_context)
autocast.register("fastcnn::linear", autocast.LOWER)


@torch.library.triton_op("fastcnn::linear_triton", mutates_args=())
def linear_triton(input: Tensor, weight: Tensor, bias: Optional[Tensor], act: Optional[str]) -> Tensor:
    return _run_forward(_triton_linear, input, weight, bias, act)


route_to_triton_when_compiled(linear, linear_triton)

direct.register_reference("fastcnn::linear", reference_linear)
