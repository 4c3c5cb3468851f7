"""The model registry: every builder in fastcnn.models registers itself under its
name, so `get_model("resnet50", num_classes=10)` and the benchmark CLI find it."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}


def register_model(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Registers a builder function under its own name."""
    if builder.__name__ in _BUILDERS:
        raise ValueError(f"a model named {builder.__name__!r} is already registered")
    _BUILDERS[builder.__name__] = builder
    return builder


def list_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_BUILDERS)


def get_model(name: str, **kwargs) -> nn.Module:
    """Builds the model registered as `name`; kwargs go to its builder."""
    if name not in _BUILDERS:
        raise ValueError(f"no model named {name!r}; the models are: {', '.join(list_models())}")
    return _BUILDERS[name](**kwargs)


def load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor] | str | os.PathLike | None,
                 ignore_prefixes: tuple[str, ...] = ()) -> nn.Module:
    """Loads a state_dict, or the state_dict saved at a path, with strict=True. Keys
    under `ignore_prefixes` (parts the model was built without, such as GoogLeNet's
    auxiliary classifiers) are dropped first."""
    if weights is None:
        return model
    if isinstance(weights, (str, os.PathLike)):
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a state_dict or a path to one, got {type(weights).__name__}")
    if ignore_prefixes:
        weights = {k: v for k, v in weights.items() if not k.startswith(ignore_prefixes)}
    model.load_state_dict(weights, strict=True)
    return model
