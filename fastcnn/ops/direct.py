"""Calling an op's body without the dispatcher, when nothing needs the dispatcher.

A custom op call goes through torch's dispatcher and the Python layers of
torch.library (autograd wrapper, redispatch): about 25 us per call on a CPU, more
than many of the kernels it launches at batch 1. When no gradient is wanted and
no tracing, mode or transform is active, the op's own Python body gives the same
result, so `call` runs it directly. Everything else (autograd, torch.compile,
fake and meta tensors, dispatch and function modes such as torch.device(...),
functorch transforms, the profiler) goes through the op as usual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_BODIES: dict[str, Callable] = {}


def custom_op(name: str, **kwargs):
    """torch.library.custom_op that also keeps the op's Python body for `call`."""
    def register(fn):
        _BODIES[name] = fn
        return torch.library.custom_op(name, **kwargs)(fn)
    return register


def _plain(t) -> bool:
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not t.is_meta


def modes_active() -> bool:
    """Tracing, a dispatch or function mode, a functorch transform or the profiler."""
    return (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled() or torch._C._are_functorch_transforms_active()
            or torch._C._autograd._profiler_enabled())


def dispatcher_needed(args) -> bool:
    if modes_active():
        return True
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, torch.Tensor) and (not _plain(a) or (grad and a.requires_grad)):
            return True
    return False


def call(name: str, *args):
    """torch.ops.<name>(*args), run without the dispatcher where that changes nothing."""
    if dispatcher_needed(args):
        namespace, op = name.split("::")
        return getattr(getattr(torch.ops, namespace), op)(*args)
    return _BODIES[name](*args)
