"""LeNet-5 (LeCun et al., 1998) as in the seed notes: a 32x32 grey image, two 5x5
convolutions each followed by 2x2 average pooling, then three fully connected layers.
Every activation runs in the epilogue of the layer before it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastcnn import nn as fnn
from fastcnn.models.fusable import FusableModel
from fastcnn.models.registry import load_weights, register_model


class LeNet5(FusableModel):
    """(N, 1, 32, 32) -> conv 5x5 x6 -> avg-pool 2 -> conv 5x5 x16 -> avg-pool 2 ->
    FC 400->120 -> FC 120->84 -> FC 84->num_classes. nn.Identity keeps the place of
    each fused activation, so the state_dict keys are those of the same network
    written with separate torch.nn activation modules."""

    def __init__(self, num_classes: int = 10, activation: str = "tanh"):
        super().__init__()
        if activation not in ("tanh", "relu"):
            raise ValueError(f"activation must be 'tanh' (as in the paper) or 'relu', got {activation!r}")
        self.features = nn.Sequential(
            fnn.Conv2d(1, 6, 5, activation=activation), nn.Identity(), fnn.AvgPool2d(2),
            fnn.Conv2d(6, 16, 5, activation=activation), nn.Identity(), fnn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            fnn.Linear(16 * 5 * 5, 120, activation=activation), nn.Identity(),
            fnn.Linear(120, 84, activation=activation), nn.Identity(),
            fnn.Linear(84, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model
def lenet5(*, num_classes: int = 10, activation: str = "tanh", weights=None) -> LeNet5:
    """LeNet-5 for 32x32 single-channel images; activation "tanh" (the paper) or "relu"."""
    return load_weights(LeNet5(num_classes, activation), weights)
