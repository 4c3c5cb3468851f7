"""fastcnn's ops as plain functions, in the style of torch.nn.functional.

Each checks its arguments before calling the op, so that a wrong type gets an
error naming the argument rather than the dispatcher's schema mismatch."""

from __future__ import annotations

import torch
from torch import Tensor

from fastcnn.ops import add_act as _add_act


def add_act(a: Tensor, b: Tensor, act: str | None = "relu") -> Tensor:
    """Residual add, then `act` (None or "relu"): act(a + b) in one pass."""
    _add_act.check_add_act(a, b, act)
    return torch.ops.fastcnn.add_act(a, b, act)
