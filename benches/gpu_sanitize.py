"""Every op of the cuda backend once, forward and backward, on small odd shapes that reach
the kernels' edge cases (partial tiles, padding, strides, groups, C = 3, channels_last and
NCHW, float32 and float16), for compute-sanitizer's memcheck:

    compute-sanitizer --tool memcheck python benches/gpu_sanitize.py [float32] [float16]

Results are checked by the tests; this prints each case's largest relative error against
PyTorch only so that a garbage result shows in the sanitizer's log too."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as TF

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastcnn  # noqa: E402
from fastcnn import functional as F  # noqa: E402

# FASTCNN_SANITIZE_DEVICE=cpu runs the same cases on the cpu backend (a dry run of this script).
DEVICE = torch.device(os.environ.get("FASTCNN_SANITIZE_DEVICE", "cuda"))
CL = torch.channels_last


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


def leaf(shape, dtype, layout=None):
    t = torch.randn(shape, device=DEVICE, dtype=dtype)
    if layout is not None:
        t = t.contiguous(memory_format=layout)
    return t.requires_grad_()


def check(name: str, ours, theirs, inputs) -> None:
    """Forward and backward of `ours` and `theirs` on the same leaves; prints the errors."""
    out = ours(*inputs)
    grad = torch.randn_like(out)
    ours_grads = torch.autograd.grad(out, [t for t in inputs if t is not None and t.requires_grad], grad)
    # NCHW references: torch's CUDA avg_pool2d backward is wrong for channels_last with
    # padding (pytorch/pytorch#188344).
    ref_inputs = [None if t is None else t.detach().double().contiguous().requires_grad_(t.requires_grad)
                  for t in inputs]
    ref = theirs(*ref_inputs)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_inputs if t is not None and t.requires_grad],
                                    grad.double().contiguous())
    errors = [rel_error(out, ref)] + [rel_error(a, b) for a, b in zip(ours_grads, ref_grads)]
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize: {name}: " + " ".join(f"{e:.1e}" for e in errors), flush=True)


def main() -> None:
    torch.manual_seed(0)
    fastcnn.use_backend("cuda" if DEVICE.type == "cuda" else "cpu")
    dtypes = [getattr(torch, name) for name in sys.argv[1:]] or [torch.float32, torch.float16]
    for dtype in dtypes:
        d = str(dtype).removeprefix("torch.")
        for layout, lname in ((CL, "cl"), (None, "nchw")):
            convs = [  # (x shape, w shape, stride, padding, dilation, groups)
                ((2, 3, 13, 11), (5, 3, 3, 3), 1, 1, 1, 1),
                ((2, 8, 9, 7), (12, 8, 1, 1), 1, 0, 1, 1),
                ((1, 6, 10, 10), (6, 3, 3, 3), 2, 1, 1, 2),
                ((2, 8, 11, 9), (8, 1, 3, 3), 1, 1, 1, 8),
                ((1, 4, 12, 12), (7, 4, 5, 5), 3, 2, 2, 1),
                ((2, 20, 7, 5), (33, 20, 3, 1), 1, (1, 0), 1, 1),
            ]
            for xs, ws, stride, padding, dilation, groups in convs:
                x, w = leaf(xs, dtype, layout), leaf(ws, dtype, layout)
                b = leaf((ws[0],), dtype)
                out_shape = TF.conv2d(x.detach(), w.detach(), None, stride, padding, dilation, groups).shape
                r = leaf(tuple(out_shape), dtype, layout)
                check(f"conv2d {d} {lname} x{xs} w{ws} s{stride} p{padding} d{dilation} g{groups}",
                      lambda x, w, b, r: F.conv2d(x, w, b, stride, padding, dilation, groups, residual=r, act="relu"),
                      lambda x, w, b, r: torch.relu(TF.conv2d(x, w, b, stride, padding, dilation, groups) + r),
                      [x, w, b, r])
            a, c = leaf((2, 10, 7, 9), dtype, layout), leaf((2, 10, 7, 9), dtype, layout)
            check(f"add_act {d} {lname}", F.add_act, lambda a, c: torch.relu(a + c), [a, c])
            x, bias = leaf((3, 10, 5, 7), dtype, layout), leaf((10,), dtype)
            check(f"bias_act tanh {d} {lname}", lambda x, b: F.bias_act(x, b, "tanh"),
                  lambda x, b: torch.tanh(x + b.view(1, -1, 1, 1)), [x, bias])
            x = leaf((2, 5, 13, 11), dtype, layout)
            check(f"max_pool2d {d} {lname}", lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
                  lambda x: TF.max_pool2d(x, 3, 2, 1, ceil_mode=True), [x])
            check(f"avg_pool2d {d} {lname}", lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False),
                  lambda x: TF.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False), [x])
            check(f"global_avg_pool2d {d} {lname}", F.global_avg_pool2d,
                  lambda x: TF.adaptive_avg_pool2d(x, 1), [x])
            x = leaf((2, 7, 6, 5), dtype, layout)
            check(f"local_response_norm {d} {lname}", lambda x: F.local_response_norm(x, 5, 1e-2, 0.75, 2.0),
                  lambda x: TF.local_response_norm(x, 5, 1e-2, 0.75, 2.0), [x])
        for m, k, n in ((5, 19, 7), (33, 70, 10)):
            x, w, b = leaf((m, k), dtype), leaf((n, k), dtype), leaf((n,), dtype)
            check(f"linear {d} {m}x{k}->{n}", lambda x, w, b: F.linear(x, w, b, act="relu"),
                  lambda x, w, b: torch.relu(TF.linear(x, w, b)), [x, w, b])
    print("sanitize: done", flush=True)


if __name__ == "__main__":
    main()
