"""ResNet (He et al., 2015), torchvision's layout (v1.5: a bottleneck's stride sits in
its 3x3 convolution) and state_dict keys.

While training, every convolution is followed by BatchNorm, so a block ends in
bn -> add -> ReLU (AddReLU: one pass). Once fuse() has folded each BatchNorm into
its convolution, a block ends in one kernel: the last convolution adds the shortcut
and applies ReLU in its epilogue."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastcnn import nn as fnn
from fastcnn.models.fusable import FusableModel, fold_conv_batch_norm
from fastcnn.models.registry import load_weights, register_model


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> fnn.Conv2d:
    return fnn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> fnn.Conv2d:
    return fnn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class _Block(nn.Module):
    """What both block kinds share: the shortcut and the fused/unfused ending."""

    expansion = 1
    fused = False

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    def finish(self, last_conv: nn.Module, last_bn: nn.Module, out: Tensor, identity: Tensor) -> Tensor:
        """relu(bn(conv(out)) + identity): one convolution once fused, else conv, then
        BatchNorm, then the add and ReLU in one pass."""
        if self.fused:
            return last_conv(out, residual=identity)
        return self.add_relu(last_bn(last_conv(out)), identity)


class BasicBlock(_Block):
    """Two 3x3 convolutions (ResNet-18/34)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = fnn.BatchNorm2dReLU(planes)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.add_relu = fnn.AddReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn1(self.conv1(x))
        return self.finish(self.conv2, self.bn2, out, self.shortcut(x))

    def fuse_(self) -> None:
        self.conv1, self.bn1 = fold_conv_batch_norm(self.conv1, self.bn1), nn.Identity()
        self.conv2, self.bn2 = _fold_with_residual(self.conv2, self.bn2), nn.Identity()
        self.fused = True


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (with the stride), 1x1 expand x4 (ResNet-50/101/152)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = fnn.BatchNorm2dReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = fnn.BatchNorm2dReLU(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.add_relu = fnn.AddReLU()
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.finish(self.conv3, self.bn3, out, self.shortcut(x))

    def fuse_(self) -> None:
        self.conv1, self.bn1 = fold_conv_batch_norm(self.conv1, self.bn1), nn.Identity()
        self.conv2, self.bn2 = fold_conv_batch_norm(self.conv2, self.bn2), nn.Identity()
        self.conv3, self.bn3 = _fold_with_residual(self.conv3, self.bn3), nn.Identity()
        self.fused = True


def _fold_with_residual(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """The block's last convolution with its BN folded and ReLU after the residual."""
    fused = fold_conv_batch_norm(conv, bn)
    fused.activation = "relu"
    return fused


class ResNet(FusableModel):
    def __init__(self, block: type[_Block], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False):
        super().__init__()
        self.inplanes = 64
        self.conv1 = fnn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = fnn.BatchNorm2dReLU(64)
        self.maxpool = fnn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = fnn.AdaptiveAvgPool2d((1, 1))
        self.fc = fnn.Linear(512 * block.expansion, num_classes)
        _init_weights(self, zero_init_residual)

    def _make_layer(self, block: type[_Block], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def fuse_(self) -> None:
        self.conv1, self.bn1 = fold_conv_batch_norm(self.conv1, self.bn1), nn.Identity()


def _init_weights(model: ResNet, zero_init_residual: bool) -> None:
    """torchvision's ResNet initialisation."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:  # each block starts as the identity
        for m in model.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def _builder(name: str, block: type[_Block], layers: list[int]):
    def build(*, num_classes: int = 1000, zero_init_residual: bool = False, weights=None) -> ResNet:
        return load_weights(ResNet(block, layers, num_classes, zero_init_residual), weights)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = f"ResNet-{name[6:]}, torchvision's layout."
    return register_model(build)


resnet18 = _builder("resnet18", BasicBlock, [2, 2, 2, 2])
resnet34 = _builder("resnet34", BasicBlock, [3, 4, 6, 3])
resnet50 = _builder("resnet50", Bottleneck, [3, 4, 6, 3])
resnet101 = _builder("resnet101", Bottleneck, [3, 4, 23, 3])
resnet152 = _builder("resnet152", Bottleneck, [3, 8, 36, 3])
