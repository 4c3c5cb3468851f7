"""VGG (Simonyan and Zisserman, 2014): stacks of 3x3 "same" convolutions and 2x2/2
max-pooling, then three FC layers; with and without batch norm. torchvision's
layout and state_dict keys (VGG-16: 138,357,544 parameters)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastcnn import nn as fnn
from fastcnn.models.fusable import FusableModel
from fastcnn.models.registry import load_weights, register_model

# Output channels of each 3x3 convolution; "M" is a 2x2/2 max-pool.
CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}


class VGG(FusableModel):
    """Without batch norm each ReLU runs in its convolution's epilogue; with batch
    norm (training) it runs on BatchNorm2dReLU until fuse() folds the BN into the
    convolution. nn.Identity keeps each fused module's index, so the keys match."""

    def __init__(self, config: list[int | str], batch_norm: bool = False, num_classes: int = 1000,
                 dropout: float = 0.5):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for v in config:
            if v == "M":
                layers.append(fnn.MaxPool2d(2, 2))
            elif batch_norm:
                layers += [fnn.Conv2d(in_channels, v, 3, padding=1), fnn.BatchNorm2dReLU(v), nn.Identity()]
            else:
                layers += [fnn.Conv2dReLU(in_channels, v, 3, padding=1), nn.Identity()]
            in_channels = v if v != "M" else in_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = fnn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            fnn.Linear(512 * 7 * 7, 4096, activation="relu"), nn.Identity(), nn.Dropout(dropout),
            fnn.Linear(4096, 4096, activation="relu"), nn.Identity(), nn.Dropout(dropout),
            fnn.Linear(4096, num_classes),
        )
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def _init_weights(model: nn.Module) -> None:
    """torchvision's VGG initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


def _builder(name: str, batch_norm: bool):
    def build(*, num_classes: int = 1000, dropout: float = 0.5, weights=None) -> VGG:
        return load_weights(VGG(CONFIGS[name], batch_norm, num_classes, dropout), weights)

    build.__name__ = build.__qualname__ = name + ("_bn" if batch_norm else "")
    build.__doc__ = f"{name.upper()}{' with batch norm' if batch_norm else ''}, torchvision's layout."
    return register_model(build)


vgg11, vgg13, vgg16, vgg19 = (_builder(n, False) for n in CONFIGS)
vgg11_bn, vgg13_bn, vgg16_bn, vgg19_bn = (_builder(n, True) for n in CONFIGS)
