"""GoogLeNet / Inception v1 (Szegedy et al., 2014), torchvision's layout and
state_dict keys (6,624,904 parameters without the auxiliary classifiers).

Each Inception module allocates its output once and every branch writes its
channels into a slice of it (once fused, fastcnn.functional.conv2d's `out=`; in
training, after BatchNorm and ReLU, through BranchesIntoSlices), so there is no
torch.cat (except under torch.func transforms, forward-mode AD and torch.fx
tracing). As in torchvision, the "5x5" branch uses a 3x3 convolution (its
checkpoints were trained that way)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastcnn import nn as fnn
from fastcnn.models.fusable import FusableModel, fold_conv_batch_norm
from fastcnn.models.registry import load_weights, register_model
from fastcnn.ops import autocast, direct
from fastcnn.ops.layout import memory_format_of


class GoogLeNetOutputs(NamedTuple):
    """What GoogLeNet returns in training mode with its auxiliary classifiers."""
    logits: Tensor
    aux_logits2: Tensor | None
    aux_logits1: Tensor | None


class BranchesIntoSlices(torch.autograd.Function):
    """One new tensor holding the branches side by side along the channels, each
    copied into its slice; the backward hands each branch its slice of the gradient
    as a view, as torch.cat's does. (A copy into a view of a plain tensor instead made
    autograd's CopySlices copy the whole output's gradient, once per branch, and hand
    the branch an NCHW copy of its slice: channels_last training then ran ReLU's and
    BatchNorm's backward on mixed layouts, GoogLeNet's step ~10% slower.)"""

    @staticmethod
    def forward(ctx, *branches: Tensor) -> Tensor:
        first = branches[0]
        ctx.channels = [b.shape[1] for b in branches]
        out = torch.empty((first.shape[0], sum(ctx.channels), *first.shape[2:]), dtype=first.dtype,
                          device=first.device, memory_format=memory_format_of(first))
        offset = 0
        for branch, channels in zip(branches, ctx.channels):
            out.narrow(1, offset, channels).copy_(branch)
            offset += channels
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        offsets = [sum(ctx.channels[:i]) for i in range(len(ctx.channels))]
        return tuple(grad.narrow(1, offset, channels) for offset, channels in zip(offsets, ctx.channels))


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 0.001) -> ReLU; one convolution once fused.
    Given `out`, the result goes to out[:, channel_offset:channel_offset + C]."""

    def __init__(self, in_channels: int, out_channels: int, **conv_args):
        super().__init__()
        self.conv = fnn.Conv2d(in_channels, out_channels, bias=False, **conv_args)
        self.bn = fnn.BatchNorm2dReLU(out_channels, eps=0.001)

    def forward(self, x: Tensor, out: Tensor | None = None, channel_offset: int = 0) -> Tensor:
        if isinstance(self.bn, nn.Identity):  # fused: the convolution writes the slice itself
            return self.conv(x, out=out, channel_offset=channel_offset)
        y = self.bn(self.conv(x))
        if out is None:
            return y
        return out.narrow(1, channel_offset, y.shape[1]).copy_(y)

    def fuse_(self) -> None:
        self.conv, self.bn = fold_conv_batch_norm(self.conv, self.bn), nn.Identity()


class Inception(nn.Module):
    """Four parallel branches (1x1; 1x1 -> 3x3; 1x1 -> "5x5"; 3x3 max-pool -> 1x1)
    whose outputs lie side by side along the channels of one tensor."""

    def __init__(self, in_channels: int, ch1x1: int, ch3x3red: int, ch3x3: int, ch5x5red: int, ch5x5: int,
                 pool_proj: int):
        super().__init__()
        self.branch1 = BasicConv2d(in_channels, ch1x1, kernel_size=1)
        self.branch2 = nn.Sequential(BasicConv2d(in_channels, ch3x3red, kernel_size=1),
                                     BasicConv2d(ch3x3red, ch3x3, kernel_size=3, padding=1))
        self.branch3 = nn.Sequential(BasicConv2d(in_channels, ch5x5red, kernel_size=1),
                                     BasicConv2d(ch5x5red, ch5x5, kernel_size=3, padding=1))
        self.branch4 = nn.Sequential(fnn.MaxPool2d(3, stride=1, padding=1, ceil_mode=True),
                                     BasicConv2d(in_channels, pool_proj, kernel_size=1))
        self.out_channels = ch1x1 + ch3x3 + ch5x5 + pool_proj

    def forward(self, x: Tensor) -> Tensor:
        branches = (self.branch1, self.branch2, self.branch3, self.branch4)
        if direct.transformed() or isinstance(x, torch.fx.Proxy):
            # torch.func transforms, forward-mode AD and torch.fx see through neither the
            # autograd Function nor writes into a tensor allocated here: torch.cat.
            return torch.cat([branch(x) for branch in branches], dim=1)
        lasts = [branch[-1] if isinstance(branch, nn.Sequential) else branch for branch in branches]
        if not all(isinstance(last.bn, nn.Identity) for last in lasts):  # BatchNorm, ReLU, then the slice
            return BranchesIntoSlices.apply(*(branch(x) for branch in branches))
        n, _, h, w = x.shape
        # in the dtype the convolutions compute in (under autocast, its dtype): they write into it
        out = torch.empty((n, self.out_channels, h, w), dtype=autocast.dtype_for("fastcnn::conv2d", x),
                          device=x.device, memory_format=memory_format_of(x))
        offset = 0
        for branch, last in zip(branches, lasts):  # fused: each last convolution writes its slice itself
            y = x
            for module in (branch[:-1] if isinstance(branch, nn.Sequential) else ()):
                y = module(y)
            last(y, out, offset)
            offset += last.conv.out_channels  # an int even under torch.jit.trace, where shapes are traced
        return out


class InceptionAux(nn.Module):
    """The auxiliary side classifier used in training: 4x4 average pool, 1x1 conv,
    FC-ReLU, dropout 0.7, FC."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.7):
        super().__init__()
        self.avgpool = fnn.AdaptiveAvgPool2d((4, 4))
        self.conv = BasicConv2d(in_channels, 128, kernel_size=1)
        self.fc1 = fnn.Linear(2048, 1024, activation="relu")
        self.fc2 = fnn.Linear(1024, num_classes)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.conv(self.avgpool(x)), 1)
        return self.fc2(self.dropout(self.fc1(x)))


class GoogLeNet(FusableModel):
    """transform_input=True maps input normalised with ImageNet's mean and std to the
    (x - 0.5) / 0.5 scaling torchvision's GoogLeNet checkpoint was trained on, as
    torchvision's googlenet(weights=...) does."""

    def __init__(self, num_classes: int = 1000, aux_logits: bool = True, dropout: float = 0.2,
                 dropout_aux: float = 0.7, transform_input: bool = False):
        super().__init__()
        self.aux_logits = aux_logits
        self.transform_input = transform_input
        self.conv1 = BasicConv2d(3, 64, kernel_size=7, stride=2, padding=3)
        self.maxpool1 = fnn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.conv2 = BasicConv2d(64, 64, kernel_size=1)
        self.conv3 = BasicConv2d(64, 192, kernel_size=3, padding=1)
        self.maxpool2 = fnn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception3a = Inception(192, 64, 96, 128, 16, 32, 32)
        self.inception3b = Inception(256, 128, 128, 192, 32, 96, 64)
        self.maxpool3 = fnn.MaxPool2d(3, stride=2, ceil_mode=True)
        self.inception4a = Inception(480, 192, 96, 208, 16, 48, 64)
        self.inception4b = Inception(512, 160, 112, 224, 24, 64, 64)
        self.inception4c = Inception(512, 128, 128, 256, 24, 64, 64)
        self.inception4d = Inception(512, 112, 144, 288, 32, 64, 64)
        self.inception4e = Inception(528, 256, 160, 320, 32, 128, 128)
        self.maxpool4 = fnn.MaxPool2d(2, stride=2, ceil_mode=True)
        self.inception5a = Inception(832, 256, 160, 320, 32, 128, 128)
        self.inception5b = Inception(832, 384, 192, 384, 48, 128, 128)
        if aux_logits:
            self.aux1 = InceptionAux(512, num_classes, dropout_aux)
            self.aux2 = InceptionAux(528, num_classes, dropout_aux)
        else:
            self.aux1 = self.aux2 = None
        self.avgpool = fnn.AdaptiveAvgPool2d((1, 1))
        self.dropout = nn.Dropout(dropout)
        self.fc = fnn.Linear(1024, num_classes)
        # transform_input's per-channel affine map, as buffers that follow the model to
        # its device and dtype (not in the state_dict: torchvision's keys stay as they
        # are); made per call, they were copied to the GPU on every forward. Made in
        # float64, so that a float64 model gets them exact.
        scale, shift = _half_scale_affine()
        self.register_buffer("input_scale", scale, persistent=False)
        self.register_buffer("input_shift", shift, persistent=False)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor | GoogLeNetOutputs:
        """The logits; in training mode with aux_logits, GoogLeNetOutputs(logits,
        aux_logits2, aux_logits1) as torchvision returns them."""
        if self.transform_input:
            x = x * self.input_scale.to(x.dtype) + self.input_shift.to(x.dtype)
        x = self.conv3(self.conv2(self.maxpool1(self.conv1(x))))
        x = self.inception3b(self.inception3a(self.maxpool2(x)))
        x = self.inception4a(self.maxpool3(x))
        aux1 = self.aux1(x) if self.aux1 is not None and self.training else None
        x = self.inception4d(self.inception4c(self.inception4b(x)))
        aux2 = self.aux2(x) if self.aux2 is not None and self.training else None
        x = self.maxpool4(self.inception4e(x))
        x = self.inception5b(self.inception5a(x))
        x = self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))
        if self.training and self.aux_logits:
            return GoogLeNetOutputs(x, aux2, aux1)
        return x


_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _half_scale_affine() -> tuple[Tensor, Tensor]:
    """(scale, shift) per channel that map x normalised as (v - mean) / std to
    (v - 0.5) / 0.5: x * scale + shift."""
    scale = torch.tensor([s / 0.5 for s in _IMAGENET_STD], dtype=torch.float64).view(1, 3, 1, 1)
    shift = torch.tensor([(m - 0.5) / 0.5 for m in _IMAGENET_MEAN], dtype=torch.float64).view(1, 3, 1, 1)
    return scale, shift


def _init_weights(model: nn.Module) -> None:
    """torchvision's GoogLeNet initialisation."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, mean=0.0, std=0.01, a=-2, b=2)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


@register_model
def googlenet(*, num_classes: int = 1000, aux_logits: bool = True, dropout: float = 0.2,
              dropout_aux: float = 0.7, transform_input: bool = False, weights=None) -> GoogLeNet:
    """GoogLeNet (Inception v1); the auxiliary classifiers exist with aux_logits=True
    and run in training mode. A checkpoint's auxiliary weights are ignored when the
    model is built without them. With torchvision's ImageNet checkpoint pass
    transform_input=True, as torchvision's own builder does for it."""
    model = GoogLeNet(num_classes, aux_logits, dropout, dropout_aux, transform_input)
    return load_weights(model, weights, ignore_prefixes=() if aux_logits else ("aux1.", "aux2."))
