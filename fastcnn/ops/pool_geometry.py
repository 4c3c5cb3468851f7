"""Pooling arguments: normalised to pairs, checked as torch.nn.functional checks
them (each error naming the argument), and turned into output sizes and the flat
geometry list the C++/CUDA kernels take (kernels/include/fastcnn/pool_geometry.h)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def pair(name: str, value, *, allow_none=False) -> tuple[int, int] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 1 and isinstance(value[0], int):
        return (value[0], value[0])
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return (value[0], value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def pooled_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """Output length along one axis, exactly as PyTorch computes it."""
    span = size + 2 * pad - dilation * (kernel - 1) - 1 + (stride - 1 if ceil_mode else 0)
    out = span // stride + 1
    # With ceil_mode the last window must start inside the input or its left padding.
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@dataclass(frozen=True)
class PoolParams:
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool

    def output_hw(self, h: int, w: int) -> tuple[int, int]:
        return (pooled_size(h, self.kernel[0], self.stride[0], self.padding[0], self.dilation[0], self.ceil_mode),
                pooled_size(w, self.kernel[1], self.stride[1], self.padding[1], self.dilation[1], self.ceil_mode))


def pool_params(input, kernel_size, stride, padding, dilation, ceil_mode) -> PoolParams:
    """Checks a 4-D pooling's arguments against `input` (N, C, H, W) and returns them as pairs."""
    kernel = pair("kernel_size", kernel_size)
    stride = pair("stride", stride, allow_none=True) or kernel
    padding = pair("padding", padding)
    dilation = pair("dilation", dilation)
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    if min(kernel) <= 0:
        raise ValueError(f"kernel_size must be positive, got {kernel}")
    if min(stride) <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(dilation) <= 0:
        raise ValueError(f"dilation must be positive, got {dilation}")
    if min(padding) < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")
    if padding[0] > kernel[0] // 2 or padding[1] > kernel[1] // 2:
        raise ValueError(f"padding {padding} must be at most half of kernel_size {kernel}")
    params = PoolParams(kernel, stride, padding, dilation, ceil_mode)
    h, w = input.shape[-2], input.shape[-1]
    oh, ow = params.output_hw(h, w)
    if oh < 1 or ow < 1:
        raise ValueError(
            f"input of spatial size {h}x{w} is too small for kernel_size {kernel} with padding {padding} "
            f"and dilation {dilation}: the output would be {oh}x{ow}")
    return params


def geometry(params: PoolParams, input_side: torch.Tensor, output_side: torch.Tensor) -> list[int]:
    """The 22 integers of Pool2dGeometry: sizes, window, and the strides of the
    input-side tensor (input or grad_input) and output-side tensor (output, grad_output, indices)."""
    n, c, h, w = input_side.shape
    oh, ow = output_side.shape[-2:]
    return [n, c, h, w, oh, ow, *params.kernel, *params.stride, *params.padding, *params.dilation,
            *input_side.stride(), *output_side.stride()]
