"""Fused convolution modules: torch.nn.Conv2d's arguments, parameters, initialisation
and state_dict keys, plus an activation and an optional residual input, all applied
in the convolution's epilogue (fastcnn.functional.conv2d)."""

from __future__ import annotations

import torch.nn.functional as torch_F
from torch import Tensor, nn

from fastcnn import functional as F
from fastcnn.ops.checks import check_act
from fastcnn.ops.conv2d import ACTS


class Conv2d(nn.Conv2d):
    """torch.nn.Conv2d computing act(conv(x) + bias + residual) in one kernel.

    `activation` is None, "relu", "tanh" or "sigmoid"; `forward(x, residual=None)`
    takes the residual of a ResNet block (same shape as the output), and `out=`,
    `channel_offset=` write the result into a channel slice of a larger tensor (an
    Inception module's branches). A torch.nn.Conv2d checkpoint loads as it is.

    `pack_weight` (default False; fuse() sets it on the convs of the inference model
    it returns): the CPU kernel keeps the weight packed between calls, packing again
    after an in-place change seen by the weight's version counter (not through `.data`)."""

    pack_weight = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None, *,
                 activation: str | None = None):
        check_act(activation, ACTS)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self.activation = activation

    def forward(self, input: Tensor, residual: Tensor | None = None, *, out: Tensor | None = None,
                channel_offset: int = 0) -> Tensor:
        if self.padding_mode != "zeros":  # as torch.nn.Conv2d: pad explicitly, then convolve unpadded
            input = torch_F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return F.conv2d(input, self.weight, self.bias, self.stride, padding, self.dilation, self.groups,
                        residual=residual, act=self.activation, out=out, channel_offset=channel_offset,
                        pack_weight=self.pack_weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"


class Conv2dReLU(Conv2d):
    """Conv2d followed by ReLU, fused: replaces torch.nn.Conv2d + torch.nn.ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype, activation="relu")
