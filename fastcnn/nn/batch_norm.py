"""Batch normalisation followed by ReLU: the pair every VGG-BN, ResNet and Inception
layer uses in training, where the statistics of the batch stop BatchNorm from being
folded into the convolution before it (fastcnn.fuse folds it for inference)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class BatchNorm2dReLU(nn.BatchNorm2d):
    """torch.nn.BatchNorm2d then ReLU, with BatchNorm2d's arguments, parameters,
    buffers and state_dict keys; the ReLU runs in place on the normalised output
    (BatchNorm's backward needs its input, not its output)."""

    def forward(self, input: Tensor) -> Tensor:
        return torch.relu_(super().forward(input))

    def _check_input_dim(self, input) -> None:
        # torch.fx.symbolic_trace traces into this subclass (torch.nn's own modules are
        # leaves), where the dimension check would branch on a traced value.
        if not isinstance(input, torch.fx.Proxy):
            super()._check_input_dim(input)

