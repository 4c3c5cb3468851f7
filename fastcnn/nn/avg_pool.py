"""Average pooling modules with the constructor arguments of their torch.nn namesakes."""

from __future__ import annotations

from torch import Tensor, nn

from fastcnn import functional as F


class AvgPool2d(nn.Module):
    """As torch.nn.AvgPool2d; divisor_override is not supported."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override=None):
        super().__init__()
        if divisor_override is not None:
            raise NotImplementedError("AvgPool2d: divisor_override is not supported (leave it None)")
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.ceil_mode = ceil_mode
        self.count_include_pad = count_include_pad
        self.divisor_override = None

    def forward(self, input: Tensor) -> Tensor:
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"ceil_mode={self.ceil_mode}, count_include_pad={self.count_include_pad}")


class AdaptiveAvgPool2d(nn.Module):
    """As torch.nn.AdaptiveAvgPool2d for output_size 1 or (1, 1) only: the global
    average pooling that closes ResNet, Inception and the like."""

    def __init__(self, output_size):
        super().__init__()
        def is_one(v) -> bool:
            return type(v) is int and v == 1

        if not (is_one(output_size) or (isinstance(output_size, (tuple, list)) and len(output_size) == 2
                                        and all(is_one(v) for v in output_size))):
            raise ValueError(f"AdaptiveAvgPool2d: output_size must be 1 or (1, 1), got {output_size!r}")
        self.output_size = output_size

    def forward(self, input: Tensor) -> Tensor:
        return F.global_avg_pool2d(input)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"
