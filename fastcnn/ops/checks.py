"""Argument checks shared by the ops: each error names the argument at fault and is
raised before anything is allocated or launched."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastcnn._native import ACT_CODES

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {t.layout}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dimensions, got shape {tuple(t.shape)}")


def check_matches(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, shape=True) -> None:
    """t must share ref's dtype and device (and shape unless shape=False)."""
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}")


def check_act(act, allowed: Sequence[str | None] = tuple(ACT_CODES)) -> None:
    if act not in allowed:
        raise ValueError(f"act must be one of {', '.join(repr(a) for a in allowed)}, got {act!r}")


def check_layer_bias(bias, input: torch.Tensor, weight: torch.Tensor) -> None:
    """An optional bias of a conv or FC layer: one value per output channel (weight.shape[0])."""
    if bias is None:
        return
    check_tensor("bias", bias, ndim=1)
    check_matches("bias", bias, "input", input, shape=False)
    if bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must have weight.shape[0] = {weight.shape[0]} elements, got shape "
                         f"{tuple(bias.shape)}")
