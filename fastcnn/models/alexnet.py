"""AlexNet (Krizhevsky et al., 2012): torchvision's single-GPU layout (`alexnet`, its
checkpoints load as they are) and the paper's own (`alexnet_original`: 227x227
input, 96-256-384-384-256 channels, local response normalisation, overlapping 3x3/2
max-pooling, and optionally the two-group convolutions of the paper's two GPUs)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastcnn import nn as fnn
from fastcnn.models.fusable import FusableModel
from fastcnn.models.registry import load_weights, register_model


class AlexNet(FusableModel):
    """torchvision.models.AlexNet's layers and state_dict keys; each ReLU runs in the
    epilogue of the convolution or FC layer before it (nn.Identity keeps its index)."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.5):
        super().__init__()
        self.features = nn.Sequential(
            fnn.Conv2dReLU(3, 64, 11, stride=4, padding=2), nn.Identity(), fnn.MaxPool2d(3, 2),
            fnn.Conv2dReLU(64, 192, 5, padding=2), nn.Identity(), fnn.MaxPool2d(3, 2),
            fnn.Conv2dReLU(192, 384, 3, padding=1), nn.Identity(),
            fnn.Conv2dReLU(384, 256, 3, padding=1), nn.Identity(),
            fnn.Conv2dReLU(256, 256, 3, padding=1), nn.Identity(), fnn.MaxPool2d(3, 2),
        )
        self.avgpool = fnn.AdaptiveAvgPool2d((6, 6))
        self.classifier = _classifier(256 * 6 * 6, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


class AlexNetOriginal(FusableModel):
    """The paper's network for 227x227 input. With groups=2 the second, fourth and
    fifth convolutions see only their own GPU's half of the channels, as in the paper
    (conv3 and the FC layers connect across)."""

    def __init__(self, num_classes: int = 1000, groups: int = 1, dropout: float = 0.5):
        super().__init__()
        if groups not in (1, 2):
            raise ValueError(f"groups must be 1 (one device) or 2 (the paper's two GPUs), got {groups!r}")

        def lrn():
            return fnn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0)

        self.features = nn.Sequential(
            fnn.Conv2dReLU(3, 96, 11, stride=4), nn.Identity(), lrn(), fnn.MaxPool2d(3, 2),
            fnn.Conv2dReLU(96, 256, 5, padding=2, groups=groups), nn.Identity(), lrn(), fnn.MaxPool2d(3, 2),
            fnn.Conv2dReLU(256, 384, 3, padding=1), nn.Identity(),
            fnn.Conv2dReLU(384, 384, 3, padding=1, groups=groups), nn.Identity(),
            fnn.Conv2dReLU(384, 256, 3, padding=1, groups=groups), nn.Identity(), fnn.MaxPool2d(3, 2),
        )
        self.classifier = _classifier(256 * 6 * 6, num_classes, dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


def _classifier(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout, FC-ReLU, dropout, FC-ReLU, FC: torchvision's indices 0..6."""
    return nn.Sequential(
        nn.Dropout(dropout), fnn.Linear(in_features, 4096, activation="relu"), nn.Identity(),
        nn.Dropout(dropout), fnn.Linear(4096, 4096, activation="relu"), nn.Identity(),
        fnn.Linear(4096, num_classes),
    )


@register_model
def alexnet(*, num_classes: int = 1000, dropout: float = 0.5, weights=None) -> AlexNet:
    """AlexNet in torchvision's layout (61,100,840 parameters with 1000 classes)."""
    return load_weights(AlexNet(num_classes, dropout), weights)


@register_model
def alexnet_original(*, num_classes: int = 1000, groups: int = 1, dropout: float = 0.5,
                     weights=None) -> AlexNetOriginal:
    """AlexNet as in the paper: 227x227 input, LRN, optionally two-group convolutions."""
    return load_weights(AlexNetOriginal(num_classes, groups, dropout), weights)
