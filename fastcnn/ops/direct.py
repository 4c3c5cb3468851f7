"""Calling an op's body without the dispatcher, when nothing needs the dispatcher.

A custom op call goes through torch's dispatcher and the Python layers of
torch.library (autograd wrapper, redispatch): about 25 us per call on a CPU, more
than many of the kernels it launches at batch 1. When no tracing, mode or
transform is active and the tensors are plain, the op's own Python body gives the
same result, so `call` runs it directly; where a gradient is wanted, under a
torch.autograd.Function made of the op's registered backward and setup_context
(register_autograd). Everything else (torch.compile, fake and meta tensors,
dispatch and function modes such as torch.device(...), functorch transforms, the
profiler) goes through the op as usual.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_BODIES: dict[str, Callable] = {}
_AUTOGRAD: dict[str, type] = {}  # register_autograd's Functions, by op name


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


def register_autograd(op, name: str, backward: Callable, setup_context: Callable) -> None:
    """op.register_autograd(backward, setup_context=...), and the same two functions
    as a torch.autograd.Function over the op's body, which `call` applies when a
    gradient is wanted and nothing else needs the dispatcher: the same graph and
    formulas without the dispatcher's and torch.library's layers around each
    forward and backward."""
    op.register_autograd(backward, setup_context=setup_context)
    body = _BODIES[name]

    # forward(ctx, *args) in the combined style: a Function with a separate
    # setup_context has Function.apply bind its arguments through inspect.signature
    # on every call (~25 us). That style is only needed under functorch transforms,
    # which take the op itself (modes_active).
    def forward(ctx, *args):
        out = body(*args)
        setup_context(ctx, args, out)
        return out

    _AUTOGRAD[name] = type(name.replace("::", "_") + "_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })



def _grad_wanted(args) -> bool | None:
    """None where the dispatcher is needed (a mode, or a tensor that is not a plain
    strided one), else whether autograd must record the call."""
    if modes_active():
        return None
    grad = torch.is_grad_enabled()
    wanted = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if not _plain(a) or a.layout != torch.strided:
                return None
            wanted = wanted or (grad and a.requires_grad)
    return wanted


def dispatcher_needed(args) -> bool:
    return _grad_wanted(args) is not False


def call(name: str, *args):
    """torch.ops.<name>(*args), run without the dispatcher where that changes nothing:
    the body itself when no gradient is wanted, the body under the op's own autograd
    formulas (register_autograd) when one is."""
    wanted = _grad_wanted(args)
    if wanted is False:
        return _BODIES[name](*args)
    if wanted and name in _AUTOGRAD:
        return _AUTOGRAD[name].apply(*args)
    namespace, op = name.split("::")
    return getattr(getattr(torch.ops, namespace), op)(*args)
