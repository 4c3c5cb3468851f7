"""The compiled kernel modules and the raw values they are called with.

fastcnn._cpu and fastcnn._cuda take data pointers, sizes, strides and small
integer codes; this module turns tensors into those.
"""

from __future__ import annotations

import importlib

import torch

# Codes shared with kernels/include/fastcnn/scalar.h; keep the two in step.
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}
ACT_CODES = {None: 0, "relu": 1, "tanh": 2, "sigmoid": 3}

_modules: dict[str, object] = {}
_import_errors: dict[str, str] = {}


def load(name: str):
    """fastcnn._cpu or fastcnn._cuda, or None if it was not built or fails to import."""
    if name not in _modules and name not in _import_errors:
        try:
            _modules[name] = importlib.import_module(f"fastcnn.{name}")
        except ImportError as exc:
            _import_errors[name] = str(exc)
    return _modules.get(name)


def import_error(name: str) -> str | None:
    load(name)
    return _import_errors.get(name)


def dtype_code(t: torch.Tensor) -> int:
    return DTYPE_CODES[t.dtype]


def stream_of(t: torch.Tensor) -> int:
    """Handle of torch's current CUDA stream on t's device: kernels never use the default stream."""
    return torch.cuda.current_stream(t.device).cuda_stream
