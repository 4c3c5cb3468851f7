"""Benchmark cases for the conv and FC layers of the classic networks
(fastcnn/bench/layers.py): fastcnn's fused layer against the way a user writes it
in eager PyTorch: the convolution (cuDNN on a GPU, oneDNN on the CPU), then the
bias, residual add and ReLU as separate ops."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastcnn import functional as fcf
from fastcnn.bench.cases import Case, nbytes
from fastcnn.bench.layers import ConvLayer, LinearLayer


def _conv_inputs(layer: ConvLayer, dtype, device, channels_last, residual: bool):
    x = torch.randn(layer.batch, layer.in_channels, *layer.size, device=device, dtype=dtype)
    fan_in = layer.in_channels // layer.groups * layer.kernel ** 2
    w = torch.randn(layer.out_channels, layer.in_channels // layer.groups, layer.kernel, layer.kernel,
                    device=device, dtype=dtype) / fan_in ** 0.5
    b = torch.randn(layer.out_channels, device=device, dtype=dtype)
    r = torch.randn(layer.batch, layer.out_channels, *layer.out_size, device=device, dtype=dtype) if residual else None
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
        r = None if r is None else r.contiguous(memory_format=torch.channels_last)
    return x, w, b, r


def _bytes_moved(inputs, y) -> int:
    return nbytes(*(t for t in (*inputs, y) if t is not None))


def _with_backward(forward):
    """forward followed by its backward; returns the output to compare. (Gradients are
    the tests' job: ReLU masks of two implementations differ where an output lies
    within rounding of zero, so gradients of separate runs need not agree.)"""
    def run(x, w, b, r, grad):
        for t in (x, w, b):
            t.grad = None
        out = forward(x, w, b, r)
        out.backward(grad)
        return out
    return run


def conv_case(layer: ConvLayer, *, channels_last: bool = True, backward: bool = False) -> Case:
    stride, pad, groups, residual = layer.stride, layer.padding, layer.groups, layer.residual

    def eager(x, w, b, r):
        y = F.conv2d(x, w, b, stride, pad, 1, groups)
        return torch.relu(y if r is None else y + r)

    def fused(x, w, b, r):
        return fcf.conv2d(x, w, b, stride, pad, 1, groups, residual=r, act="relu")

    def make_inputs(shape, dtype, device, cl):
        x, w, b, r = _conv_inputs(layer, dtype, device, cl, residual)
        if not backward:
            return x, w, b, r
        grad = torch.randn(layer.batch, layer.out_channels, *layer.out_size, device=device, dtype=dtype)
        grad = grad.contiguous(memory_format=torch.channels_last) if cl else grad
        return x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), r, grad

    mode = "fwd+bwd" if backward else "fwd"
    epilogue = "+add+relu" if residual else "+relu"
    return Case("conv2d", f"{layer.label} {epilogue} {mode}", (layer.batch, layer.in_channels, *layer.size),
                channels_last, make_inputs, eager=_with_backward(eager) if backward else eager,
                fastcnn=_with_backward(fused) if backward else fused, bytes_moved=_bytes_moved,
                flops=2 * layer.macs * (3 if backward else 1), needs_grad=backward)


def linear_case(layer: LinearLayer, *, backward: bool = False) -> Case:
    def make_inputs(shape, dtype, device, cl):
        x = torch.randn(layer.batch, layer.in_features, device=device, dtype=dtype)
        w = torch.randn(layer.out_features, layer.in_features, device=device, dtype=dtype) / layer.in_features ** 0.5
        b = torch.randn(layer.out_features, device=device, dtype=dtype)
        if not backward:
            return x, w, b, None
        grad = torch.randn(layer.batch, layer.out_features, device=device, dtype=dtype)
        return x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), None, grad

    def eager(x, w, b, r):
        return torch.relu(F.linear(x, w, b))

    def fused(x, w, b, r):
        return fcf.linear(x, w, b, act="relu")

    mode = "fwd+bwd" if backward else "fwd"
    return Case("linear", f"{layer.label} +relu {mode}", (layer.batch, layer.in_features), False, make_inputs,
                eager=_with_backward(eager) if backward else eager,
                fastcnn=_with_backward(fused) if backward else fused, bytes_moved=_bytes_moved,
                flops=2 * layer.macs * (3 if backward else 1), needs_grad=backward)


def layer_case(layer, *, channels_last: bool = True, backward: bool = False) -> Case:
    if isinstance(layer, ConvLayer):
        return conv_case(layer, channels_last=channels_last, backward=backward)
    return linear_case(layer, backward=backward)
