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
- KEEP (pooling): the op runs in its input's dtype.
- FLOAT32 (LRN): floating tensors are cast to float32, as torch's LRN computes in
  float32 under autocast (its avg_pool3d, and pow on CUDA, are on autocast's float32
  lists), so its output is float32 too.
An output written in place (conv2d's `out=`, conv2d_into's first argument) is never
cast, and where one is given the operands are cast to its dtype instead: the caller
chose the dtype (torch's autocast leaves out= calls alone, which for a fused layer
would meet float32 weights with a lowered input). The op body then runs with
autocast off, so that the `torch` backend's composition of torch ops gives the dtype
the other backends give.

The rule applies twice: on the dispatcher (torch.ops.fastcnn.*, torch.compile's
tracing) through an Autocast kernel per device type, and in fastcnn.functional
(`follows`), whose argument checks run before any op call and whose calls skip
the dispatcher where they can (fastcnn/ops/direct.py).

A fused model's convolutions keep their weights packed (pack_weight, ops/packed_weights.py),
keyed by the weight tensor: a new cast copy on every call would be packed again on
every call (ResNet-50 at batch 1 under bfloat16 autocast on the CPU: 75 ms, against
55 ms with bfloat16 weights). Where a call asks for that (`reuse_when`) and no
gradient is recorded, a weight's cast copy is kept and handed out again while the
weight's version counter is unchanged, with the same caveat as the packed copy (a
change through `.data` is not seen).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable, Sequence

import torch

LOWER = "lower"
WIDEST = "widest"
KEEP = "keep"
FLOAT32 = "float32"

_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}  # the device types, and their dispatch keys
_DEVICE_TYPES = tuple(_AUTOCAST_KEYS)
_POLICIES: dict[str, str] = {}  # op name -> policy
_LIBRARY = torch.library.Library("fastcnn", "IMPL")
_any_enabled = torch._C._is_any_autocast_enabled
_KEPT_CASTS: dict[int, tuple[int, torch.dtype, torch.Tensor]] = {}  # id(source) -> (version, dtype, copy)


def policy_of(op_name: str) -> str:
    return _POLICIES[op_name]


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
    if policy == FLOAT32:
        return torch.float32
    if policy == WIDEST:
        dtypes = [t.dtype for t in tensors if _castable(t, device_type)]
        return functools.reduce(torch.promote_types, dtypes) if dtypes else None
    return None


def _castable(t, device_type: str) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.device.type == device_type


def _kept_cast(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t.to(dtype), the same copy again while t's version counter is unchanged (no
    gradient is recorded: the copy has no graph). Inference tensors have no version
    counter: they are cast in each call."""
    if t.is_inference():
        return t.to(dtype)
    entry = _KEPT_CASTS.get(id(t))
    if entry is not None and entry[0] == t._version and entry[1] == dtype:
        return entry[2]
    if entry is None:  # first time for this tensor: forget the copy when it dies
        weakref.finalize(t, _KEPT_CASTS.pop, id(t), None)
    copy = t.to(dtype)
    _KEPT_CASTS[id(t)] = (t._version, dtype, copy)
    return copy


def _cast(t, dtype: torch.dtype | None, policy: str, device_type: str, keep: bool = False):
    if dtype is None or not _castable(t, device_type) or t.dtype == dtype:
        return t
    if policy in (LOWER, FLOAT32) and t.dtype == torch.float64:
        return t
    return _kept_cast(t, dtype) if keep else t.to(dtype)


def cast_arguments(policy: str, device_type: str, args: Sequence, out: int | None = None,
                   keep: Sequence[int] = ()) -> tuple:
    """args with each floating tensor on device_type cast as `policy` says; args[out]
    (an output written in place), where given, is left as it is and sets the dtype.
    The casts of args at positions `keep` are kept between calls (_kept_cast)."""
    if out is not None and args[out] is not None:
        dtype = args[out].dtype
        return tuple(a if i == out or not _castable(a, device_type) or a.dtype == dtype
                     else _kept_cast(a, dtype) if i in keep else a.to(dtype)
                     for i, a in enumerate(args))
    dtype = _target_dtype(policy, device_type, args)
    return tuple(_cast(a, dtype, policy, device_type, i in keep) for i, a in enumerate(args))


def dtype_for(op_name: str, *tensors: torch.Tensor) -> torch.dtype:
    """The dtype op `op_name` computes in for these tensors under the autocast state in
    force (the first tensor's dtype where autocast is off or leaves them alone): for a
    caller allocating the output it passes as out=."""
    device_type = _device_type(tensors)
    if device_type is not None:
        cast = cast_arguments(policy_of(op_name), device_type, tensors)
        return cast[0].dtype
    return tensors[0].dtype


def register(name: str, policy: str, *, out: int | None = None) -> None:
    """Op `name` ("fastcnn::...") follows `policy` under autocast on the dispatcher,
    for CPU and CUDA tensors; the argument at position `out`, where given, is an output
    written in place (see cast_arguments)."""
    _POLICIES[name] = policy
    overload = getattr(torch.ops.fastcnn, name.split("::")[1]).default
    for device_type, key_name in _AUTOCAST_KEYS.items():
        key = getattr(torch._C.DispatchKey, key_name)

        def autocast_kernel(*args, _device_type=device_type, _key=key):
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return overload(*cast_arguments(policy, _device_type, args, out))

        # The Python kernel serves tracing (torch.compile's Python dispatcher); the
        # library kernel serves eager calls.
        if overload.has_kernel_for_dispatch_key(key):
            overload.py_kernels.pop(key)
        overload.py_impl(key)(autocast_kernel)
        _LIBRARY.impl(name.split("::")[1], lambda _keyset, *args, _kernel=autocast_kernel: _kernel(*args),
                      key_name, with_keyset=True)


def follows(op_name: str, *tensor_params: str, out: str | None = None, reuse: Sequence[str] = (),
            reuse_when: str | None = None) -> Callable:
    """Decorator for a fastcnn.functional function that calls op `op_name`: under
    autocast, the tensors named `tensor_params` are cast as the op's policy says (to
    the dtype of the output parameter `out` where one is passed) and the function
    runs with autocast off. Where the argument named `reuse_when` is true and no
    gradient is recorded, the casts of the tensors named in `reuse` are kept between
    calls (a fused model's weights). Outside autocast it costs one check."""
    def wrap(fn: Callable) -> Callable:
        names = list(inspect.signature(fn).parameters)
        positions = [names.index(p) for p in (*tensor_params, *((out,) if out else ()))]
        out_index = len(tensor_params) if out else None
        reusable = tuple(tensor_params.index(p) for p in reuse)
        flag = names.index(reuse_when) if reuse_when else None

        @functools.wraps(fn)
        def run(*args, **kwargs):
            if not _any_enabled():
                return fn(*args, **kwargs)
            device_type = _device_type(args[:1] or [kwargs.get(names[0])])
            if device_type is None:
                return fn(*args, **kwargs)
            args = list(args)
            tensors = [args[i] if i < len(args) else kwargs.get(names[i]) for i in positions]
            keep = ()
            if flag is not None and not torch.is_grad_enabled():
                keep = reusable if (args[flag] if flag < len(args) else kwargs.get(names[flag])) else ()
            tensors = cast_arguments(policy_of(op_name), device_type, tensors, out_index, keep)
            for i, t in zip(positions, tensors):
                if i < len(args):
                    args[i] = t
                elif names[i] in kwargs:
                    kwargs[names[i]] = t
            with torch.autocast(device_type, enabled=False):
                return fn(*args, **kwargs)
        return run
    return wrap
