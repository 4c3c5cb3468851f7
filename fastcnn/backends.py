"""Which backend runs an op: what can run here, the default per device, and overrides.

Backends:
  triton  Triton kernels (CUDA tensors; CPU tensors too under TRITON_INTERPRET=1)
  cuda    the C++ CUDA module fastcnn._cuda
  cpu     the C++ CPU module fastcnn._cpu
  torch   a composition of PyTorch ops: the reference, always available

The default follows the tensor's device (triton on CUDA, cpu on CPU).
`use_backend(name)` (a plain call or a context manager) and the environment
variable FASTCNN_BACKEND override it.
"""

from __future__ import annotations

import contextvars
import functools
import importlib.util
import os

import torch

from fastcnn import _native

BACKENDS = ("triton", "cuda", "cpu", "torch")
_ENV = "FASTCNN_BACKEND"
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("fastcnn_backend", default=None)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Looked up once at import (resolve() runs on every op call, and the answer cannot change
# in a process); a constant, so that torch.compile does not trace into importlib.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def why_unavailable(backend: str, device_type: str) -> str | None:
    """None if `backend` can run tensors of `device_type` here, else the reason."""
    if backend == "torch":
        return None
    if backend == "triton":
        if not _TRITON_INSTALLED:
            return "the triton package is not installed"
        if device_type == "cuda" or (device_type == "cpu" and triton_interpreting()):
            return None
        if device_type == "cpu":
            return "triton runs CPU tensors only under TRITON_INTERPRET=1"
        return f"triton cannot run {device_type} tensors"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the cuda backend runs CUDA tensors, not {device_type} tensors"
        if _native.load("_cuda") is None:
            return ("fastcnn._cuda is not built (nvcc was not found when fastcnn was installed, "
                    f"or FASTCNN_CUDA=0): {_native.import_error('_cuda')}")
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the cpu backend runs CPU tensors, not {device_type} tensors"
        if _native.load("_cpu") is None:
            return f"fastcnn._cpu failed to import: {_native.import_error('_cpu')}"
        return None
    return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run here: for one device type, or for any device if None."""
    if device is not None:
        device_types = [torch.device(device).type]
    else:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [b for b in BACKENDS if any(why_unavailable(b, d) is None for d in device_types)]


def _check_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


class use_backend:
    """Select the backend for fastcnn ops: `use_backend("cuda")` sets it until changed;
    `with use_backend("torch"): ...` sets it for the block only. None restores the default."""

    def __init__(self, name: str | None):
        self._token = _override.set(None if name is None else _check_name(name))

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        _override.reset(self._token)


def selected_backend() -> str | None:
    """The override in force (use_backend, then FASTCNN_BACKEND), or None for the default."""
    name = _override.get()
    if name is None:
        env = os.environ.get(_ENV)
        if env:
            if env not in BACKENDS:
                raise ValueError(f"{_ENV}={env!r} is not a backend; choose one of {', '.join(BACKENDS)}")
            name = env
    return name


@functools.cache  # on every op call; what is built and installed cannot change in a process
def default_backend(device_type: str) -> str:
    preference = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}.get(device_type, ("torch",))
    return next(b for b in preference if why_unavailable(b, device_type) is None)


def resolve(device: torch.device) -> str:
    """The backend that runs an op on tensors of `device`; raises if the chosen one cannot."""
    name = selected_backend()
    if name is None:
        return default_backend(device.type)
    reason = why_unavailable(name, device.type)
    if reason is not None:
        raise RuntimeError(f"fastcnn backend {name!r} cannot run here: {reason}")
    return name
