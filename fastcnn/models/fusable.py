"""Inference fusion for fastcnn's own models: `model.fuse()` folds every BatchNorm
into the convolution before it, so that the BatchNorm's ReLU and a residual block's
add + ReLU move into that convolution's epilogue.

The models are written so that a fused module keeps its place: a folded BatchNorm
becomes nn.Identity, and blocks that change how they run once fused (a ResNet
block, GoogLeNet's BasicConv2d) define `fuse_()`, called children first."""

from __future__ import annotations

import copy

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastcnn.fusion.fold import fold_batch_norm, has_hooks
from fastcnn.fusion.packing import keep_weights_packed
from fastcnn.nn.batch_norm import BatchNorm2dReLU
from fastcnn.nn.residual import AddReLU


class FusableModel(nn.Module):
    """A model with `fuse()`: the same network for inference, BatchNorm folded."""

    def fuse(self, inplace: bool = False) -> "FusableModel":
        """The model with every BatchNorm folded into its convolution (eval mode only:
        training normalises with the batch's statistics). The model itself is left as
        it was unless `inplace`. Fusing a fused model changes nothing. Hooks on the
        convolutions, BatchNorms and ReLUs that fusing replaces would never run again:
        fuse() refuses them (register them on the fused model instead)."""
        # the model, or any BatchNorm in it (a fused model's Identity placeholders do not count)
        training = [name or type(self).__name__ for name, m in self.named_modules()
                    if m.training and (m is self or isinstance(m, _BatchNorm))]
        if training:
            raise ValueError(f"fuse() folds BatchNorm's running statistics, which only eval mode uses, and "
                             f"{training[0]!r} is in training mode: call .eval() first")
        hooked = [name for name, m in self.named_modules()
                  if isinstance(m, (nn.Conv2d, _BatchNorm, nn.ReLU, AddReLU)) and has_hooks(m)]
        if hooked:
            raise ValueError(f"fuse() replaces {hooked[0]!r}, which has hooks that would no longer run: remove "
                             "them and register them on the fused model")
        model = self if inplace else copy.deepcopy(self)
        if not getattr(model, "_fused", False):
            _fuse_tree(model)
            keep_weights_packed(model)
            model._fused = True
        return model



def fold_conv_batch_norm(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """conv with bn folded in; a BatchNorm2dReLU's ReLU becomes the conv's activation."""
    return fold_batch_norm(conv, bn, "relu" if isinstance(bn, BatchNorm2dReLU) else None)


def _fuse_tree(module: nn.Module) -> None:
    for child in module.children():
        _fuse_tree(child)
    if isinstance(module, nn.Sequential):
        _fuse_sequential(module)
    if hasattr(module, "fuse_"):
        module.fuse_()


def _fuse_sequential(seq: nn.Sequential) -> None:
    """Conv2d followed by BatchNorm2d(ReLU) inside a Sequential: fold, keep indices."""
    names = list(seq._modules)
    for first, second in zip(names, names[1:]):
        conv, bn = seq._modules[first], seq._modules[second]
        if isinstance(conv, nn.Conv2d) and getattr(conv, "activation", None) is None and isinstance(bn, nn.BatchNorm2d):
            seq._modules[first] = fold_conv_batch_norm(conv, bn)
            seq._modules[second] = nn.Identity()
