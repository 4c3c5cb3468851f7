"""Network in Network (Lin et al., 2013) for 224x224 RGB images: four "mlpconv"
blocks, each a convolution followed by two 1x1 convolutions (a small MLP slid over
the image), and no FC layers: the last block has one channel per class and a global
average pool turns it into the logits."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastcnn import nn as fnn
from fastcnn.models.fusable import FusableModel
from fastcnn.models.registry import load_weights, register_model


def mlpconv(in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int) -> nn.Sequential:
    """conv-ReLU, 1x1-ReLU, 1x1-ReLU with each ReLU fused (nn.Identity keeps its index)."""
    return nn.Sequential(
        fnn.Conv2dReLU(in_channels, out_channels, kernel_size, stride, padding), nn.Identity(),
        fnn.Conv2dReLU(out_channels, out_channels, 1), nn.Identity(),
        fnn.Conv2dReLU(out_channels, out_channels, 1), nn.Identity(),
    )


class NiN(FusableModel):
    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            mlpconv(3, 96, 11, 4, 0), fnn.MaxPool2d(3, 2),
            mlpconv(96, 256, 5, 1, 2), fnn.MaxPool2d(3, 2),
            mlpconv(256, 384, 3, 1, 1), fnn.MaxPool2d(3, 2),
            nn.Dropout(dropout),
            mlpconv(384, num_classes, 3, 1, 1),
        )
        self.avgpool = fnn.AdaptiveAvgPool2d(1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.flatten(self.avgpool(self.features(x)), 1)


@register_model
def nin(*, num_classes: int = 1000, dropout: float = 0.5, weights=None) -> NiN:
    """Network in Network for 224x224 RGB images."""
    return load_weights(NiN(num_classes, dropout), weights)
