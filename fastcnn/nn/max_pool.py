"""Max pooling as a module, with torch.nn.MaxPool2d's constructor arguments."""

from __future__ import annotations

from torch import Tensor, nn

from fastcnn import functional as F
from fastcnn.ops import direct
from fastcnn.ops.pool_geometry import pool_params


class MaxPool2d(nn.Module):
    """torch.nn.MaxPool2d on fastcnn::max_pool2d; with return_indices=True it returns
    (output, indices), the indices equal to torch's."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False):
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = stride if stride is not None else kernel_size
        self.padding = padding
        self.dilation = dilation
        self.return_indices = return_indices
        self.ceil_mode = ceil_mode

    def forward(self, input: Tensor):
        if not self.return_indices:
            return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        x, unbatched = F._batched(input)
        p = pool_params(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
        out, indices = direct.call("fastcnn::max_pool2d", x, list(p.kernel), list(p.stride), list(p.padding),
                                   list(p.dilation), p.ceil_mode)
        return (out.squeeze(0), indices.squeeze(0)) if unbatched else (out, indices)

    def extra_repr(self) -> str:
        return (f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, ceil_mode={self.ceil_mode}")
