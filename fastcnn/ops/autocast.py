"""fastcnn's ops under torch.autocast: the dtype each op computes in.

Custom ops are left alone by autocast unless they register a rule, so without one a
fastcnn convolution after a torch layer met a bfloat16 input and a float32 weight
(a dtype error), and a model of fastcnn layers ran in float32. Each op declares a
policy beside its definition (`register`), following what torch does with the ops
it replaces:
- LOWER (conv2d, linear): floating tensors are cast to the autocast dtype
  (float16 on CUDA, bfloat16 on the CPU by default), as for torch's conv2d and
  linear; float64 tensors are left as they are, as torch's autocast leaves them.
- WIDEST (add_act, bias_act): floating tensors are cast to the widest of their
  dtypes, as torch's `+` promotes them.
- KEEP (pooling, LRN): the op runs in its input's dtype.
The op body then runs with autocast off, so that the `torch` backend's
composition of torch ops gives the dtype the other backends give.

The rule applies twice: on the dispatcher (torch.ops.fastcnn.*, torch.compile's
tracing) through an Autocast kernel per device type, and in fastcnn.functional
(`follows`), whose argument checks run before any op call and whose calls skip
the dispatcher where they can (fastcnn/ops/direct.py).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import torch

LOWER = "lower"
WIDEST = "widest"
KEEP = "keep"

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}  # the device types, and their dispatch keys
_DEVICE_TYPES = tuple(_AUTOCAST_KEYS)
_POLICIES: dict[str, tuple[str, tuple[int, ...]]] = {}  # op name -> (policy, argument positions left alone)
_LIBRARY = torch.library.Library("fastcnn", "IMPL")
_any_enabled = torch._C._is_any_autocast_enabled


def policy_of(op_name: str) -> str:
    return _POLICIES[op_name][0]


def _device_type(tensors) -> str | None:
    """The device type of the first tensor, where autocast is on for it."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            kind = t.device.type
            if kind in _DEVICE_TYPES and torch.is_autocast_enabled(kind):
                return kind
            return None
    return None


def _target_dtype(policy: str, device_type: str, tensors) -> torch.dtype | None:
    if policy == LOWER:
        return torch.get_autocast_dtype(device_type)
    if policy == WIDEST:
        dtypes = [t.dtype for t in tensors if _castable(t, device_type)]
        return functools.reduce(torch.promote_types, dtypes) if dtypes else None
    return None


def _castable(t, device_type: str) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type


def _cast(t, dtype: torch.dtype | None, policy: str, device_type: str):
    if dtype is None or not _castable(t, device_type) or t.dtype == dtype:
        return t
    if policy == LOWER and t.dtype == torch.float64:
        return t
    return t.to(dtype)


def cast_arguments(policy: str, device_type: str, args: Sequence, skip: Sequence[int] = ()) -> tuple:
    """args with each floating tensor on device_type cast as `policy` says, except
    those at the positions in `skip` (an output written in place)."""
    dtype = _target_dtype(policy, device_type, [a for i, a in enumerate(args) if i not in skip])
    return tuple(a if i in skip else _cast(a, dtype, policy, device_type) for i, a in enumerate(args))


def register(name: str, policy: str, *, skip: Sequence[int] = ()) -> None:
    """Op `name` ("fastcnn::...") follows `policy` under autocast on the dispatcher,
    for CPU and CUDA tensors; the arguments at positions `skip` are never cast (an
    output it writes into)."""
    _POLICIES[name] = (policy, tuple(skip))
    overload = getattr(torch.ops.fastcnn, name.split("::")[1]).default
    for device_type, key_name in _AUTOCAST_KEYS.items():
        key = getattr(torch._C.DispatchKey, key_name)

        def autocast_kernel(*args, _device_type=device_type, _key=key):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return overload(*cast_arguments(policy, _device_type, args, skip))

        # The Python kernel serves tracing (torch.compile's Python dispatcher); the
        # library kernel serves eager calls.
        if overload.has_kernel_for_dispatch_key(key):
            overload.py_kernels.pop(key)
        overload.py_impl(key)(autocast_kernel)
        _LIBRARY.impl(name.split("::")[1], lambda _keyset, *args, _kernel=autocast_kernel: _kernel(*args),
                      key_name, with_keyset=True)


def follows(op_name: str, *tensor_params: str) -> Callable:
    """Decorator for a fastcnn.functional function that calls op `op_name`: under
    autocast, the tensors named `tensor_params` are cast as the op's policy says
    and the function runs with autocast off. Outside autocast it costs one check."""
    def wrap(fn: Callable) -> Callable:
        names = list(inspect.signature(fn).parameters)
        positions = [names.index(p) for p in tensor_params]

        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not _any_enabled():
                return fn(*args, **kwargs)
            device_type = _device_type(args[:1] or [kwargs.get(names[0])])
            if device_type is None:
                return fn(*args, **kwargs)
            args = list(args)
            tensors = [args[i] if i < len(args) else kwargs.get(names[i]) for i in positions]
            tensors = cast_arguments(policy_of(op_name), device_type, tensors)
            for i, t in zip(positions, tensors):
                if i < len(args):
                    args[i] = t
                elif names[i] in kwargs:
                    kwargs[names[i]] = t
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)
        return run
    return wrap
