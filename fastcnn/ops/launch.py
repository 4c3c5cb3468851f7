"""How an op calls its backends' launchers.

- CUDA and Triton launches run under the tensors' device, so that tensors on
  cuda:1 are not launched into cuda:0's context (custom ops set no device guard).
- Eager Triton launches turn off torch's `wrap_triton` tracing wrapper: outside a
  `triton_op` it routes every call through a higher-order op, which costs time
  and keeps an entry per call in its side table. The `*_triton` twins that
  torch.compile traces call the launchers unwrapped.
"""

from __future__ import annotations

import contextlib
import functools

import torch

try:
    from torch._library.triton import set_wrap_triton_enabled
except ImportError:  # older torch: wrap_triton always launches directly
    def set_wrap_triton_enabled(enabled: bool):
        return contextlib.nullcontext()

try:  # the thread-local flag behind set_wrap_triton_enabled, for the prepared launches
    from torch._library.triton import is_wrap_triton_enabled, wrap_triton_enabled as _WRAP_STATE
except ImportError:
    _WRAP_STATE = None


def _device_of(args) -> torch.device | None:
    return next((a.device for a in args if isinstance(a, torch.Tensor)), None)


def _on_tensor_device(launch):
    @functools.wraps(launch)
    def run(*args):
        device = _device_of(args)
        return _run_on(device.index if device is not None and device.type == "cuda" else None, launch, args)
    return run


def _run_on(index: int | None, launch, args):
    """launch(*args) with CUDA device `index` current (None: not a CUDA launch). The
    switch costs more than the check: only where that device is not the current one."""
    if index is None or torch.cuda.current_device() == index:
        return launch(*args)
    with torch.cuda.device(index):
        return launch(*args)


def _eager_triton(launch):
    on_device = _on_tensor_device(launch)

    @functools.wraps(launch)
    def run(*args):
        with set_wrap_triton_enabled(False):
            return on_device(*args)
    return run


def bound_triton(device: torch.device, launch):
    """A Triton launch for tensors on `device` (a prepared call's): run(*args) as the
    triton entries of backend_table run it, with `device` current. It sets the flag
    set_wrap_triton_enabled sets, itself: the context manager cost ~2.5 us a call of
    the ~35 us a prepared call takes on the 2-core CPU."""
    index = device.index if device.type == "cuda" else None
    if _WRAP_STATE is None:
        def run(*args):
            with set_wrap_triton_enabled(False):
                return _run_on(index, launch, args)
        return run

    def run_unwrapped(*args):
        previous = is_wrap_triton_enabled()
        _WRAP_STATE.value = False
        try:
            return _run_on(index, launch, args)
        finally:
            _WRAP_STATE.value = previous
    return run_unwrapped


def backend_table(*, torch, cpu=None, cuda=None, triton=None) -> dict:
    """The launcher per backend name, each wrapped as its backend needs; a backend an
    op has no implementation in (None) is left out."""
    table = {"torch": torch, "cpu": cpu, "cuda": cuda and _on_tensor_device(cuda),
             "triton": triton and _eager_triton(triton)}
    return {name: launch for name, launch in table.items() if launch is not None}
