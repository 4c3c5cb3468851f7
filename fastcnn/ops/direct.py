"""Calling an op's body without the dispatcher, when nothing needs the dispatcher.

A custom op call goes through torch's dispatcher and the Python layers of
torch.library (autograd wrapper, redispatch): about 25 us per call on a CPU, more
than many of the kernels it launches at batch 1. When no tracing, mode or
transform is active and the tensors are plain, the op's own Python body gives the
same result, so `call` runs it directly; where a gradient is wanted, under a
torch.autograd.Function made of the op's registered backward and setup_context
(register_autograd). Where an op registers a prepare function (register_prepare),
its body's checks run once per argument signature (prepared.op_launcher): the
backward formulas call their ops through `call`, so a training step checks each
op's arguments once, not on every step. Everything else (torch.compile, fake and
meta tensors, dispatch and function modes such as torch.device(...), the profiler)
goes through the op as usual.

torch.func transforms (grad, vjp, jvp, jacrev, jacfwd, hessian, vmap) and
forward-mode AD are the exception: a torch.library custom op supports neither
functorch's grad (torch refuses its autograd Function) nor forward AD (it drops
the tangents without a word), and vmap runs it one sample at a time. Under them
`call` runs the op's reference (register_reference): the same computation made of
PyTorch's own differentiable, batchable ops, after the op's own argument checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.autograd.forward_ad as forward_ad

_BODIES: dict[str, Callable] = {}
_AUTOGRAD: dict[str, type] = {}  # register_autograd's Functions, by op name
_PREPARE: dict[str, Callable] = {}  # register_prepare's functions, by op name
_REFERENCES: dict[str, Callable] = {}  # register_reference's functions, by op name


def custom_op(name: str, **kwargs):
    """torch.library.custom_op that also keeps the op's Python body for `call`."""
    def register(fn):
        _BODIES[name] = fn
        return torch.library.custom_op(name, **kwargs)(fn)
    return register


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_STRIDED = torch.strided
# The batched tensors of torch's older vmap (torch.autograd.grad(..., is_grads_batched=True),
# torch.autograd.functional.jacobian(vectorize=True)): plain in type, but without storage.
_legacy_batched = torch._C._functorch.is_legacy_batchedtensor


def modes_active() -> bool:
    """Tracing (torch.compile, torch.jit.trace), a dispatch or function mode, a
    functorch transform or the profiler. torch.jit.trace records only what reaches the
    dispatcher: a body run directly would leave its kernel launch out of the trace."""
    return (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled() or transformed()
            or torch._C._autograd._profiler_enabled())


def transformed() -> bool:
    """A torch.func transform is active, or forward-mode AD (a dual level is open)."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def register_autograd(op, name: str, backward: Callable, setup_context: Callable) -> None:
    """op.register_autograd(backward, setup_context=...), and the same two functions
    as a torch.autograd.Function over the op's body, which `call` applies when a
    gradient is wanted and nothing else needs the dispatcher: the same graph and
    formulas without the dispatcher's and torch.library's layers around each
    forward and backward."""
    op.register_autograd(backward, setup_context=setup_context)
    body = _BODIES[name]

    # forward(ctx, *args, run) in the combined style: a Function with a separate
    # setup_context has Function.apply bind its arguments through inspect.signature
    # on every call (~25 us). That style is only needed under functorch transforms,
    # which take the op's reference (register_reference). `run` is the body or a prepared
    # launcher for these arguments; it comes last so that needs_input_grad keeps
    # the op's argument positions.
    def forward(ctx, *args_and_run):
        *args, run = args_and_run
        out = run(*args)
        setup_context(ctx, args, out)
        return out

    def backward_with_run(ctx, *grads):
        grad_inputs = backward(ctx, *grads)
        if not isinstance(grad_inputs, (tuple, list)):
            grad_inputs = (grad_inputs,)
        return (*grad_inputs, None)  # none for `run`

    _AUTOGRAD[name] = type(name.replace("::", "_") + "_function", (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "backward": staticmethod(backward_with_run),
    })


def register_prepare(name: str, prepare: Callable) -> None:
    """prepare(*args) -> run or None for op `name`: its body's checks done once for
    arguments with this signature (prepared.op_launcher), run(*args) then giving
    what body(*args) gives; None where the body must run (an edge case it handles)."""
    _PREPARE[name] = prepare


def register_reference(name: str, reference: Callable) -> None:
    """reference(*args): what op `name` computes, checks included, from PyTorch ops that
    torch.func and forward-mode AD can transform; `call` runs it under them."""
    _REFERENCES[name] = reference


def grad_wanted(args) -> bool | None:
    """None where the dispatcher is needed (a mode, or a tensor that is not a plain
    strided one with storage), else whether autograd must record the call."""
    if modes_active():
        return None
    grad = torch.is_grad_enabled()
    wanted = False
    for a in args:
        if isinstance(a, torch.Tensor):
            if type(a) not in _PLAIN_TYPES or a.is_meta or a.layout != _STRIDED or _legacy_batched(a):
                return None
            if grad and not wanted:
                wanted = a.requires_grad
    return wanted


def call(name: str, *args):
    """torch.ops.<name>(*args), run without the dispatcher where that changes nothing:
    the body itself when no gradient is wanted, the body under the op's own autograd
    formulas (register_autograd) when one is; the body as prepared for arguments with
    this signature where the op has register_prepare; the op's reference under a
    torch.func transform or forward-mode AD."""
    wanted = grad_wanted(args)
    if wanted is None and name in _REFERENCES and transformed():
        return _REFERENCES[name](*args)
    if wanted is None or (wanted and name not in _AUTOGRAD):
        namespace, op = name.split("::")
        return getattr(getattr(torch.ops, namespace), op)(*args)
    prepare = _PREPARE.get(name)
    run = (prepare and prepared.op_launcher(name, args, prepare)) or _BODIES[name]
    return _AUTOGRAD[name].apply(*args, run) if wanted else run(*args)


def apply(name: str, run: Callable, *args):
    """op `name` on args, recorded by autograd through its Function, with `run` (a
    prepared launcher for these arguments) in place of the body; for callers that
    have found a gradient wanted and no dispatcher needed (grad_wanted is True)."""
    return _AUTOGRAD[name].apply(*args, run)


# At the end: prepared.py imports this module (grad_wanted, apply).
from fastcnn.ops import prepared  # noqa: E402
