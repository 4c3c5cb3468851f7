"""What every Triton kernel file shares: the accumulation dtype and activations."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from fastcnn._native import ACT_CODES

try:  # the thread-local flag that torch's triton_op clears for its eager calls
    from torch._library.triton import is_wrap_triton_enabled
except ImportError:  # older torch: every launch through wrap_triton
    def is_wrap_triton_enabled() -> bool:
        return True


def launchable(kernel):
    """`kernel` for a launch `launchable(kernel)[grid](...)`: through torch's wrap_triton
    where torch.compile may be tracing it (a triton_op twin, whose launches it records),
    the kernel itself where the launch is eager (fastcnn's launchers, ops/launch.py, and
    triton_op's own eager calls clear the flag; wrap_triton would then launch it
    directly too). wrap_triton builds two wrappers and looks the kernel up in torch's
    side table twice per launch: ~16 us on the 2-core CPU, against ~20 us for the rest
    of fastcnn's Python in a prepared conv call."""
    return wrap_triton(kernel) if is_wrap_triton_enabled() else kernel


def acc_dtype(dtype: torch.dtype):
    """float64 stays float64; everything else is computed in float32 (the interpreter
    also mishandles bfloat16 arithmetic, so nothing is computed in it)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


# Host-side integer helpers for grids and block sizes. triton.cdiv and
# triton.next_power_of_2 are constexpr functions in recent Triton, whose call from
# Python costs ~3 us each (measured on the 2-core CPU), and a launch computes a dozen.
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """As triton.next_power_of_2: 0 for 0, else the least power of two >= n."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


def act_code(act: str | None) -> int:
    return ACT_CODES[act]


@triton.jit
def apply_act(v, ACT: tl.constexpr):
    # Codes as in fastcnn._native.ACT_CODES. NaN passes through ReLU, as in torch.relu.
    if ACT == 1:
        v = tl.where(v < 0, 0.0, v).to(v.dtype)
    elif ACT == 2:
        e = tl.exp(-2.0 * tl.abs(v))
        t = (1.0 - e) / (1.0 + e)
        v = tl.where(v < 0, -t, t).to(v.dtype)
    elif ACT == 3:
        v = (1.0 / (1.0 + tl.exp(-v))).to(v.dtype)
    return v


@triton.jit
def act_grad_from_output(grad, y, ACT: tl.constexpr):
    if ACT == 1:
        grad = tl.where(y <= 0, 0.0, grad).to(grad.dtype)  # NaN output passes grad, as in torch
    elif ACT == 2:
        grad = grad * (1.0 - y * y)
    elif ACT == 3:
        grad = grad * y * (1.0 - y)
    return grad
