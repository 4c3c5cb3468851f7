"""Prepared launches: an eager call's checks done once per signature.

A layer calls its op with the same kinds of arguments every time, and at batch 1
checking them, normalising them and working out the output's size and layout cost
more than many of the kernels. The first call with a given signature (each
tensor's shape, strides, dtype and device; the other arguments' reprs, so that
True and 1 stay apart; the selected backend) runs the op's usual checks and
returns a launcher: a closure that allocates the output and launches the kernel,
reading only the tensors' data. Later calls with that signature run the launcher.

Only calls that direct.call would run without the dispatcher get one (plain
tensors, no tracing or mode): everything else, and any call whose preparation
fails, takes the op's usual path, which checks again and raises the error that
names the argument at fault. Where a gradient is wanted, the launcher applies the
op's autograd Function (direct.apply) over a launcher for the op's own body.
direct.call prepares op bodies the same way (op_launcher), which is what the
backward formulas' calls and the functions without a launcher of their own use.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from fastcnn import backends
from fastcnn.ops import direct
from fastcnn.ops.layout import memory_format_of

Launcher = Callable[..., torch.Tensor]

_PREPARED: dict[tuple, Launcher | None] = {}
_MAX_PREPARED = 4096


def launcher(op: str, tensors: tuple, options: tuple, prepare: Callable[..., Launcher | None],
             prepare_grad: Callable[..., Launcher | None] | None = None) -> Launcher | None:
    """The launcher for `op` called with `tensors` (each a tensor or None) and
    `options` (everything else), from prepare(*tensors, *options) on first use, or,
    where autograd must record the call, from prepare_grad (a launcher that applies
    the op's autograd Function: direct.apply); None where the call must take the
    op's usual path."""
    if any(t is not None and not isinstance(t, torch.Tensor) for t in tensors):
        return None  # not a tensor: the usual path names the argument
    wanted = direct.grad_wanted(tensors)
    if wanted is None or (wanted and prepare_grad is None):
        return None
    selected = backends.selected_backend()
    key = (op, wanted, selected, os.environ.get("TRITON_INTERPRET") if selected == "triton" else None,
           repr(options), *(None if t is None else (t.shape, t.stride(), t.dtype, t.device) for t in tensors))
    return _cached(key, prepare_grad if wanted else prepare, (*tensors, *options))


def op_launcher(op: str, args: tuple, prepare: Callable[..., Launcher | None]) -> Launcher | None:
    """For direct.call, whose caller has found that no dispatcher is needed: the
    launcher run(*args) for op `op` called with its own arguments `args`, from
    prepare(*args) (direct.register_prepare) on first use; None where the op's body
    must run. Keyed by the selected backend and each argument in its place: a tensor
    by its signature, a list (of sizes: the schema's int[]) by its items, anything
    else by its type and value, so that True and 1 stay apart. (Built in one pass:
    on every backward op call, and ~2 us cheaper than `launcher`'s reprs.)"""
    selected = backends.selected_backend()
    key = [op, selected, os.environ.get("TRITON_INTERPRET") if selected == "triton" else None]
    for a in args:
        if isinstance(a, torch.Tensor):
            key.append((a.shape, a.stride(), a.dtype, a.device))
        elif type(a) is list:
            key.append(tuple(a))
        else:
            key.append((type(a), a))
    return _cached(tuple(key), prepare, args)


def _cached(key: tuple, prepare: Callable[..., Launcher | None], args: tuple) -> Launcher | None:
    try:
        return _PREPARED[key]
    except KeyError:
        pass
    try:
        run = prepare(*args)
    except Exception:  # noqa: BLE001 - the usual path raises it, with its message
        return None
    if len(_PREPARED) >= _MAX_PREPARED:
        _PREPARED.clear()
    _PREPARED[key] = run
    return run


def clear() -> None:
    """Forgets every prepared launcher (they hold no tensors, only sizes and kernels)."""
    _PREPARED.clear()


def allocating(shape, launch: Callable[..., None], like: torch.Tensor | None = None,
               memory_format: torch.memory_format | None = None) -> Launcher:
    """A launcher (*tensors) -> out for an op with one output: out is new, of `shape`,
    in `memory_format`, else in the layout of `like` (a tensor with the first argument's
    signature; None: contiguous), and launch(*tensors, out) fills it unless it is empty."""
    shape = tuple(shape)
    if memory_format is not None:
        fmt = memory_format
    else:
        fmt = memory_format_of(like) if like is not None and len(shape) == 4 else torch.contiguous_format
    nonempty = all(shape)

    def run(first, *rest):
        out = torch.empty(shape, dtype=first.dtype, device=first.device, memory_format=fmt)
        if nonempty:
            launch(first, *rest, out)
        return out
    return run
