"""Convolution arguments: checked as torch.nn.functional.conv2d checks them (each
error naming the argument), normalised to pairs, and turned into the output size
and the flat geometry list the C++/CUDA kernels take
(kernels/include/fastcnn/conv_geometry.h).

Padding may be an int, a pair, "valid" or "same" (stride 1 only, as in PyTorch);
the ops carry it as four ints (top, left, bottom, right).
"same" with an even kernel pads one more on the bottom/right than on the top/left:
the kernels take the top/left padding and the output size, and treat every input
position outside the image as zero, so uneven padding costs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastcnn.ops.pool_geometry import pair


@dataclass(frozen=True)
class ConvParams:
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]  # top, left, bottom, right
    dilation: tuple[int, int]
    groups: int

    def as_lists(self) -> tuple[list[int], list[int], list[int], int]:
        """(stride, padding, dilation, groups) as the op schemas take them."""
        return list(self.stride), list(self.padding), list(self.dilation), self.groups

    def output_hw(self, h: int, w: int, kh: int, kw: int) -> tuple[int, int]:
        top, left, bottom, right = self.padding
        return (conv_out_size(h, kh, self.stride[0], top, bottom, self.dilation[0]),
                conv_out_size(w, kw, self.stride[1], left, right, self.dilation[1]))


def conv_out_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def _padding(padding, kernel: tuple[int, int], stride, dilation) -> tuple[tuple[int, int], tuple[int, int]]:
    """(before, after) padding per axis."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            if stride != (1, 1):
                raise ValueError(f"padding='same' needs stride 1, got stride {stride}")
            total = [d * (k - 1) for d, k in zip(dilation, kernel)]
            return (total[0] // 2, total[1] // 2), (total[0] - total[0] // 2, total[1] - total[1] // 2)
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    if (isinstance(padding, (tuple, list)) and len(padding) == 4
            and all(isinstance(p, int) and not isinstance(p, bool) for p in padding)):
        if min(padding) < 0:
            raise ValueError(f"padding must be non-negative, got {tuple(padding)}")
        return (padding[0], padding[1]), (padding[2], padding[3])  # as the op schemas carry it
    pad = pair("padding", padding)
    if min(pad) < 0:
        raise ValueError(f"padding must be non-negative, got {pad}")
    return pad, pad


# A layer calls with the same arguments every time: checked once, remembered (the
# key holds the arguments' reprs, so True and 1 stay apart).
_CHECKED: dict[tuple, ConvParams] = {}
_CHECKED_MAX = 4096


def conv_params(input: torch.Tensor, weight: torch.Tensor, stride=1, padding=0, dilation=1,
                groups: int = 1) -> ConvParams:
    """Checks a convolution's arguments against input (N, C, H, W) and weight
    (C_out, C / groups, KH, KW) and returns them normalised."""
    key = (tuple(input.shape[1:]), tuple(weight.shape), repr(stride), repr(padding), repr(dilation), repr(groups))
    try:
        params = _CHECKED.get(key)
    except TypeError:  # symbolic sizes while torch.compile traces: not hashable
        return _checked_conv_params(input, weight, stride, padding, dilation, groups)
    if params is None:
        params = _checked_conv_params(input, weight, stride, padding, dilation, groups)
        if len(_CHECKED) >= _CHECKED_MAX:
            _CHECKED.clear()
        _CHECKED[key] = params
    return params


def _checked_conv_params(input, weight, stride, padding, dilation, groups) -> ConvParams:
    stride = pair("stride", stride)
    dilation = pair("dilation", dilation)
    if min(stride) <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if min(dilation) <= 0:
        raise ValueError(f"dilation must be positive, got {dilation}")
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups <= 0:
        raise ValueError(f"groups must be positive, got {groups}")
    if input.shape[1] == 0:
        raise ValueError(f"input must have at least one channel, got shape {tuple(input.shape)}")
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"input must have a non-empty image (H, W > 0), got shape {tuple(input.shape)}")
    c_out, c_per_group, kh, kw = weight.shape
    if min(kh, kw) <= 0:
        raise ValueError(f"weight must have a non-empty kernel, got shape {tuple(weight.shape)}")
    if c_out % groups != 0:
        raise ValueError(f"weight.shape[0] = {c_out} output channels must be divisible by groups = {groups}")
    if input.shape[1] != c_per_group * groups:
        raise ValueError(
            f"input has {input.shape[1]} channels but weight of shape {tuple(weight.shape)} with groups = {groups} "
            f"expects {c_per_group * groups}")
    before, after = _padding(padding, (kh, kw), stride, dilation)
    params = ConvParams(stride, (*before, *after), dilation, groups)
    h, w = input.shape[2], input.shape[3]
    oh, ow = params.output_hw(h, w, kh, kw)
    if oh < 1 or ow < 1:
        raise ValueError(
            f"input of spatial size {h}x{w} is too small for a {kh}x{kw} kernel with padding {padding} "
            f"and dilation {dilation}: the output would be {oh}x{ow}")
    return params


def geometry(params: ConvParams, input_shape, weight_shape) -> list[int]:
    """The 16 integers of ConvGeometry, in its field order (top/left padding only:
    the output size implies the rest)."""
    n, c, h, w = input_shape
    c_out, _, kh, kw = weight_shape
    oh, ow = params.output_hw(h, w, kh, kw)
    return [n, c, h, w, c_out, kh, kw, oh, ow, *params.stride, *params.padding[:2], *params.dilation,
            params.groups]
