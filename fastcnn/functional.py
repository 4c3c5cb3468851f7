"""fastcnn's ops as plain functions, in the style of torch.nn.functional.

Each checks its arguments before calling its op, so that a wrong argument gets an
error naming it rather than the dispatcher's schema mismatch. Pooling functions
take (N, C, H, W) input, or unbatched (C, H, W) as torch.nn.functional does. Under
torch.autocast each casts its tensors as its op's policy says (fastcnn/ops/autocast.py)."""

from __future__ import annotations

import torch
from torch import Tensor

import fastcnn.ops  # noqa: F401  (registers torch.ops.fastcnn.*)
from fastcnn.ops import autocast, direct, prepared
from fastcnn.ops.checks import check_tensor
from fastcnn.ops.avg_pool2d import prepare_avg_pool2d, prepare_avg_pool2d_grad
from fastcnn.ops.conv2d import (check_conv2d, check_conv2d_into, check_user_padding, prepare_conv2d,
                                prepare_conv2d_grad)
from fastcnn.ops.global_avg_pool2d import prepare_global_avg_pool2d
from fastcnn.ops.linear import check_linear, prepare_linear, prepare_linear_grad
from fastcnn.ops.max_pool2d import prepare_max_pool2d
from fastcnn.ops.pool_geometry import pool_params


@autocast.follows("fastcnn::add_act", "a", "b")
def add_act(a: Tensor, b: Tensor, act: str | None = "relu") -> Tensor:
    """Residual add, then `act` (None or "relu"): act(a + b) in one pass."""
    from fastcnn.ops.add_act import check_add_act
    check_add_act(a, b, act)
    return direct.call("fastcnn::add_act", a, b, act)


@autocast.follows("fastcnn::bias_act", "x", "bias")
def bias_act(x: Tensor, bias: Tensor, act: str | None = "relu") -> Tensor:
    """Per-channel bias (along dim 1), then `act` (None, "relu", "tanh" or "sigmoid")."""
    from fastcnn.ops.bias_act import check_bias_act
    check_bias_act(x, bias, act)
    return direct.call("fastcnn::bias_act", x, bias, act)


def _batched(input: Tensor) -> tuple[Tensor, bool]:
    check_tensor("input", input)
    if input.dim() not in (3, 4):
        raise ValueError(f"input must have 3 (C, H, W) or 4 (N, C, H, W) dimensions, got shape {tuple(input.shape)}")
    return (input.unsqueeze(0), True) if input.dim() == 3 else (input, False)


@autocast.follows("fastcnn::max_pool2d")
def max_pool2d(input: Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False) -> Tensor:
    """As torch.nn.functional.max_pool2d; the backward is deterministic (no atomics).
    Without a gradient to compute, no indices are kept (half the bytes written)."""
    run = prepared.launcher("max_pool2d", (input,), (kernel_size, stride, padding, dilation, ceil_mode),
                            prepare_max_pool2d)
    if run is not None:
        return run(input)
    x, unbatched = _batched(input)
    p = pool_params(x, kernel_size, stride, padding, dilation, ceil_mode)
    window = (list(p.kernel), list(p.stride), list(p.padding), list(p.dilation), p.ceil_mode)
    if torch.is_grad_enabled() and x.requires_grad:
        out, _ = direct.call("fastcnn::max_pool2d", x, *window)
    else:
        out = direct.call("fastcnn::max_pool2d_no_indices", x, *window)
    return out.squeeze(0) if unbatched else out


@autocast.follows("fastcnn::avg_pool2d")
def avg_pool2d(input: Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True) -> Tensor:
    """As torch.nn.functional.avg_pool2d (without divisor_override)."""
    run = prepared.launcher("avg_pool2d", (input,), (kernel_size, stride, padding, ceil_mode, count_include_pad),
                            prepare_avg_pool2d, prepare_avg_pool2d_grad)
    if run is not None:
        return run(input)
    x, unbatched = _batched(input)
    p = pool_params(x, kernel_size, stride, padding, 1, ceil_mode)
    if not isinstance(count_include_pad, bool):
        raise TypeError(f"count_include_pad must be a bool, got {count_include_pad!r}")
    out = direct.call("fastcnn::avg_pool2d", x, list(p.kernel), list(p.stride), list(p.padding), p.ceil_mode,
                                       count_include_pad)
    return out.squeeze(0) if unbatched else out


def adaptive_avg_pool2d(input: Tensor, output_size) -> Tensor:
    """As torch.nn.functional.adaptive_avg_pool2d: output size 1 (global average
    pooling, which closes ResNet, NiN and Inception) runs fastcnn::global_avg_pool2d;
    an input that already has the output size is copied (AlexNet's and VGG's pool at
    224x224: a new tensor, as torch's, so that writing into it leaves the input alone);
    other sizes run PyTorch's kernel."""
    _batched(input)  # the checks: a floating-point (C, H, W) or (N, C, H, W) tensor
    sizes = checked_adaptive_pair(output_size, minimum=0)
    in_h, in_w = input.shape[-2:]
    out_h, out_w = (in_h if sizes[0] is None else sizes[0]), (in_w if sizes[1] is None else sizes[1])
    if out_h == 1 and out_w == 1:
        return global_avg_pool2d(input)
    if out_h == in_h and out_w == in_w:
        return input.clone()
    return torch.nn.functional.adaptive_avg_pool2d(input, output_size)


def checked_adaptive_pair(output_size, minimum: int) -> tuple:
    """torch.nn.AdaptiveAvgPool2d's output_size as (h, w), None keeping that input size,
    after checking it: each side None or an int of at least `minimum` (torch's function
    takes 0, an empty output; its module does not)."""
    if output_size is None or isinstance(output_size, int):
        sizes = (output_size, output_size)
    else:
        sizes = tuple(output_size) if isinstance(output_size, (tuple, list)) else ()
    if len(sizes) != 2 or not all(v is None or (type(v) is int and v >= minimum) for v in sizes):
        raise ValueError(f"output_size must be an int of at least {minimum}, or a pair of such ints or Nones (None "
                         f"keeps that input size), got {output_size!r}")
    return sizes


@autocast.follows("fastcnn::global_avg_pool2d")
def global_avg_pool2d(input: Tensor) -> Tensor:
    """Mean over H and W: torch.nn.functional.adaptive_avg_pool2d(input, 1)."""
    run = prepared.launcher("global_avg_pool2d", (input,), (), prepare_global_avg_pool2d)
    if run is not None:
        return run(input)
    x, unbatched = _batched(input)
    out = direct.call("fastcnn::global_avg_pool2d", x)
    return out.squeeze(0) if unbatched else out


@autocast.follows("fastcnn::conv2d", "input", "weight", "bias", "residual", out="out", reuse=("weight", "bias"),
                   reuse_when="pack_weight")
def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
           groups: int = 1, *, residual: Tensor | None = None, act: str | None = None, out: Tensor | None = None,
           channel_offset: int = 0, pack_weight: bool = False) -> Tensor:
    """act(torch.nn.functional.conv2d(input, weight, bias, ...) + residual) in one kernel.

    `padding` is an int, a pair, "valid" or "same" as in PyTorch; `act` is None,
    "relu", "tanh" or "sigmoid"; `residual` has the output's shape. With `out`,
    the result is written into out[:, channel_offset:channel_offset + C_out] and
    that slice is returned (an Inception module's branches fill one tensor); when
    a gradient is needed the result is computed first and then copied there. Inputs
    that share memory with out (a residual added in place) are read as they were
    before the call.
    `pack_weight=True` (for inference; the convs of a fused model set it) lets the
    CPU keep the weight in its kernel's packed layout between calls, packing again
    when the weight's data pointer or version counter changes (see
    fastcnn/ops/packed_weights.py): not for weights changed through `.data`."""
    run = prepared.launcher("conv2d", (input, weight, bias, residual, out),
                            (stride, padding, dilation, groups, act, channel_offset, pack_weight), prepare_conv2d,
                            prepare_conv2d_grad)
    if run is not None:
        return run(input, weight, bias, residual, out)
    x, unbatched = _batched(input)
    check_user_padding(padding)
    if out is None and channel_offset != 0:
        raise ValueError("channel_offset needs out: it says where in out the result goes")
    if unbatched:
        residual, out = (_unsqueezed(name, t) for name, t in (("residual", residual), ("out", out)))
    params = check_conv2d(x, weight, bias, residual, stride, padding, dilation, groups, act)
    args = (x, weight, bias, residual, *params.as_lists(), act)
    if out is None:
        y = direct.call("fastcnn::conv2d", *args)
    else:
        target = check_conv2d_into(out, channel_offset, x, weight, params)
        # conv2d_into has no autograd: it may only run when no gradient passes through
        # (nor a torch.func transform or forward-mode AD, which take conv2d's reference).
        grad_needed = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias, residual, out))
        if grad_needed or direct.transformed():
            target.copy_(direct.call("fastcnn::conv2d", *args))
        else:
            direct.call("fastcnn::conv2d_into", out, channel_offset, *args)
        y = target
    return y.squeeze(0) if unbatched else y


def _unsqueezed(name: str, t: Tensor | None) -> Tensor | None:
    """An unbatched (C, H, W) companion tensor with its batch dim added."""
    if t is None:
        return None
    check_tensor(name, t)
    if t.dim() != 3:
        raise ValueError(f"{name} must have 3 dimensions (C, H, W) like the unbatched input, got shape "
                         f"{tuple(t.shape)}")
    return t.unsqueeze(0)


def conv2d_relu(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0, dilation=1,
                groups: int = 1, *, residual: Tensor | None = None, out: Tensor | None = None,
                channel_offset: int = 0, pack_weight: bool = False) -> Tensor:
    """conv2d(..., act="relu"): relu(conv + bias + residual)."""
    return conv2d(input, weight, bias, stride, padding, dilation, groups, residual=residual, act="relu", out=out,
                  channel_offset=channel_offset, pack_weight=pack_weight)


@autocast.follows("fastcnn::linear", "input", "weight", "bias")
def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None, *, act: str | None = None) -> Tensor:
    """act(torch.nn.functional.linear(input, weight, bias)) as one GEMM with its epilogue fused."""
    run = prepared.launcher("linear", (input, weight, bias), (act,), prepare_linear, prepare_linear_grad)
    if run is not None:
        return run(input, weight, bias)
    check_linear(input, weight, bias, act)
    return direct.call("fastcnn::linear", input, weight, bias, act)


@autocast.follows("fastcnn::local_response_norm", "input")
def local_response_norm(input: Tensor, size: int, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0) -> Tensor:
    """As torch.nn.functional.local_response_norm: normalisation across channels (dim 1)
    of (N, C, *) input. 3-D (N, C, L) and 5-D or more run as (N, C, L, 1) and (N, C, D, rest)."""
    from fastcnn.ops.local_response_norm import check_lrn_params
    check_tensor("input", input)
    check_lrn_params(size, alpha, beta, k)
    if input.dim() < 3:
        raise ValueError(f"input must have 3 or more dimensions (N, C, *), got shape {tuple(input.shape)}")
    x = input.unsqueeze(-1) if input.dim() == 3 else input.flatten(3) if input.dim() > 4 else input
    out = direct.call("fastcnn::local_response_norm", x, size, alpha, beta, k)
    return out.reshape(input.shape) if input.dim() != 4 else out


# torch.fx.symbolic_trace records each function as one call (a leaf) instead of tracing into
# its argument checks, which need real tensors: a model of fastcnn layers traces like one of
# torch.nn layers.
for _name in ("add_act", "bias_act", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "global_avg_pool2d", "conv2d",
              "conv2d_relu", "linear", "local_response_norm"):
    torch.fx.wrap(_name)
