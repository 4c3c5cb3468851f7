"""The last step of fusing a model for inference: its convolutions keep their weights
packed for the CPU kernel between calls (fastcnn.nn.Conv2d.pack_weight,
fastcnn/ops/packed_weights.py)."""

from __future__ import annotations

from torch import nn

from fastcnn.nn.conv2d import Conv2d


def keep_weights_packed(model: nn.Module) -> None:
    """Sets pack_weight on every fastcnn Conv2d in the model."""
    for module in model.modules():
        if isinstance(module, Conv2d):
            module.pack_weight = True
