"""Average pooling modules with the constructor arguments of their torch.nn namesakes."""

from __future__ import annotations

from torch import Tensor, nn

from fastcnn import functional as F
from fastcnn.functional import checked_adaptive_pair


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
    """As torch.nn.AdaptiveAvgPool2d. Output size 1 (global average pooling, which
    closes ResNet, NiN and Inception) runs fastcnn::global_avg_pool2d; an input that
    already has the output size is copied (AlexNet's and VGG's pool at 224x224); other
    sizes fall back to PyTorch's kernel."""

    def __init__(self, output_size):
        super().__init__()
        checked_adaptive_pair(output_size, minimum=1)
        self.output_size = output_size

    def forward(self, input: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(input, self.output_size)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"

