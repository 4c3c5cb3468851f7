"""Test-time averaging: several crops of each image (`multi_crop`) and several networks
(`Ensemble`), as AlexNet's paper does at test time: average the predictions of the
four corner and centre crops and their mirrors, and of several trained networks.

Both average "probs" by default: softmax of each output, then the mean (the paper's
"averaging the predictions of the softmax layer"); the result is a probability per
class. average="logits" takes the mean of the outputs as they are, which is also the
choice for a model that already returns probabilities (an Ensemble(average="probs")
inside multi_crop)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["AVERAGES", "Ensemble", "crop_boxes", "multi_crop"]

AVERAGES = ("probs", "logits")


def crop_boxes(height: int, width: int, crop_height: int, crop_width: int) -> list[tuple[int, int]]:
    """(top, left) of the five crops in torchvision's five_crop order: top-left,
    top-right, bottom-left, bottom-right, centre (rounded as torchvision's center_crop)."""
    dy, dx = height - crop_height, width - crop_width
    return [(0, 0), (0, dx), (dy, 0), (dy, dx), (int(round(dy / 2.0)), int(round(dx / 2.0)))]


def multi_crop(model: nn.Module, images: Tensor, crops: int = 10, size: int | tuple[int, int] | None = None,
               average: str = "probs") -> Tensor:
    """The model's output averaged over crops of each image of `images` (N, C, H, W).

    crops=10: the four corner crops and the centre crop (torchvision's five_crop
    positions), then the horizontal mirror of each, as in AlexNet's paper (torchvision's
    ten_crop crops the mirrored image instead, which moves the centre crop by a pixel
    when the margin is odd); crops=5: the first five; crops=1: the centre crop.

    `size` is the crop's side, or (height, width); None takes 7/8 of each side (224 of
    256, AlexNet's and VGG's ratio). All crops go through the model as one batch of
    N * crops images. Returns (N, ...) as one output of the model."""
    _check_average(average)
    if isinstance(crops, bool) or crops not in (1, 5, 10):
        raise ValueError(f"crops must be 1 (centre), 5 (corners and centre) or 10 (and their mirrors), got {crops!r}")
    if not isinstance(images, Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a 4-D (N, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    height, width = images.shape[-2:]
    if size is None:
        crop_h, crop_w = height * 7 // 8, width * 7 // 8
    elif isinstance(size, int) and not isinstance(size, bool):
        crop_h = crop_w = size
    elif (isinstance(size, (tuple, list)) and len(size) == 2
          and all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        crop_h, crop_w = size
    else:
        raise TypeError(f"size must be an int, a pair of ints (height, width) or None, got {size!r}")
    if not (0 < crop_h <= height and 0 < crop_w <= width):
        raise ValueError(f"size ({crop_h}x{crop_w}) must be positive and fit in the {height}x{width} images")
    boxes = crop_boxes(height, width, crop_h, crop_w)
    if crops == 1:
        boxes = boxes[-1:]
    views = [images[..., top:top + crop_h, left:left + crop_w] for top, left in boxes]
    if crops == 10:
        views += [view.flip(-1) for view in views]
    n = images.shape[0]
    outputs = _output_of(model, torch.cat(views), "model")
    return _mean(outputs.unflatten(0, (len(views), n)), average)


class Ensemble(nn.Module):
    """Several models used as one: forward(*args, **kwargs) calls each member with the
    same arguments and averages their outputs (never their weights), as `average` says.
    The members must give outputs of one shape."""

    def __init__(self, models: Iterable[nn.Module], average: str = "probs"):
        super().__init__()
        _check_average(average)
        models = list(models)
        if not models:
            raise ValueError("models must hold at least one model")
        for i, model in enumerate(models):
            if not isinstance(model, nn.Module):
                raise TypeError(f"models[{i}] must be an nn.Module, got {type(model).__name__}")
        self.members = nn.ModuleList(models)
        self.average = average

    def forward(self, *args, **kwargs) -> Tensor:
        outputs = []
        for i, model in enumerate(self.members):
            out = _output_of(model, None, f"models[{i}]", *args, **kwargs)
            if outputs and out.shape != outputs[0].shape:
                raise ValueError(f"models[{i}] returned shape {tuple(out.shape)}, models[0] "
                                 f"{tuple(outputs[0].shape)}: an ensemble averages outputs of one shape")
            outputs.append(out)
        return _mean(torch.stack(outputs), self.average)

    def extra_repr(self) -> str:
        return f"average={self.average!r}"


def _output_of(model: nn.Module, x: Tensor | None, what: str, *args, **kwargs) -> Tensor:
    out = model(x) if x is not None else model(*args, **kwargs)
    if not isinstance(out, Tensor):
        raise TypeError(f"{what} returned {type(out).__name__}, not a tensor (GoogLeNet returns its side "
                        "classifiers' outputs too in training mode: call .eval())")
    return out


def _mean(stacked: Tensor, average: str) -> Tensor:
    """Mean over dim 0 of stacked outputs (K, N, classes, ...); "probs" softmaxes dim 2
    first, in float32 at least so that half-precision outputs average without overflow."""
    if average == "probs":
        return stacked.softmax(dim=2, dtype=torch.promote_types(stacked.dtype, torch.float32)).mean(0).to(stacked.dtype)
    return stacked.mean(0)


def _check_average(average: str) -> None:
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
