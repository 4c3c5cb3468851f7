"""Folding an eval-mode BatchNorm into the convolution or linear layer before it:
bn(conv(x)) == conv'(x) with w' = w * scale[k] and b' = (b - mean) * scale + beta,
scale = gamma / sqrt(var + eps). Computed in float64, stored in the layer's dtype.
Also what both fusions (fastcnn.fuse, model.fuse()) ask of the layers they replace:
has_hooks, and requires_grad_like for the new layers' parameters."""

from __future__ import annotations


import torch
from torch import nn

from fastcnn.nn.conv2d import Conv2d


def batch_norm_scale_shift(bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) in float64 with bn(x) == x * scale + shift per channel in eval mode."""
    if not bn.track_running_stats or bn.running_mean is None:
        raise ValueError(f"{type(bn).__name__} has no running statistics (track_running_stats=False): "
                         "its output depends on the batch, so it cannot be folded")
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    return scale, shift


@torch.no_grad()
def fold_batch_norm(conv: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm, activation: str | None = None) -> Conv2d:
    """A fastcnn Conv2d computing activation(bn(conv(x))) for eval mode; `conv` and
    `bn` are left as they were. The result always has a bias."""
    if bn.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm has {bn.num_features} features but the convolution has "
                         f"{conv.out_channels} output channels")
    scale, shift = batch_norm_scale_shift(bn)
    fused = to_fastcnn_conv(conv, activation, bias=True)
    weight = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return requires_grad_like(fused, conv, bn)


@torch.no_grad()
def to_fastcnn_conv(conv: nn.Conv2d, activation: str | None, bias: bool | None = None) -> Conv2d:
    """A fastcnn Conv2d with conv's geometry, weights and hooks-free state, plus
    `activation`; `bias=True` adds a zero bias where conv had none."""
    has_bias = conv.bias is not None if bias is None else bias
    fused = Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                   conv.dilation, conv.groups, has_bias, conv.padding_mode, conv.weight.device, conv.weight.dtype,
                   activation=activation)
    fused.weight.copy_(conv.weight)
    if has_bias:
        fused.bias.copy_(conv.bias if conv.bias is not None else torch.zeros_like(fused.bias))
    fused.train(conv.training)
    return requires_grad_like(fused, conv)


def has_hooks(module: nn.Module) -> bool:
    """Hooks would be lost (or see other values) if the module were fused away."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or getattr(module, "_backward_pre_hooks", None))


def requires_grad_like(fused: nn.Module, *sources: nn.Module) -> nn.Module:
    """`fused` (whose parameters are new) with requires_grad as its sources had it: set
    where any parameter of theirs required grad, else cleared, so that fusing a frozen
    model gives a frozen one (no autograd graph at inference)."""
    wanted = any(p.requires_grad for source in sources for p in source.parameters(recurse=False))
    return fused.requires_grad_(wanted)


__all__ = ["batch_norm_scale_shift", "fold_batch_norm", "has_hooks", "requires_grad_like", "to_fastcnn_conv"]
