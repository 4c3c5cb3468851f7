"""The CPU kernels under valgrind's memcheck: no read or write outside the tensors
and buffers they own, on small odd shapes that reach each kernel's edge cases
(partial tiles and panels, padding, strides, groups, the direct and row-update
paths), forward and backward. Skipped where valgrind or fastcnn._cpu is missing.

Results are checked elsewhere; this test only looks at memory. Invalid reads and
writes reported in frames of fastcnn._cpu fail it; the dynamic loader's and
Python's own reports are ignored."""

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import fastcnn

SCRIPT = textwrap.dedent("""
    import torch
    from fastcnn import functional as F

    torch.manual_seed(0)
    cl = torch.channels_last

    def grad_step(out):
        out.backward(torch.randn_like(out))

    def conv(shape, w_shape, layout="nchw", dtype=torch.float32, residual=False, **kw):
        x = torch.randn(shape, dtype=dtype)
        w = torch.randn(w_shape, dtype=dtype)
        if layout == "channels_last":
            x, w = x.contiguous(memory_format=cl), w.contiguous(memory_format=cl)
        x.requires_grad_(); w.requires_grad_()
        b = torch.randn(w_shape[0], dtype=dtype, requires_grad=True)
        r = None
        if residual:
            ref = torch.nn.functional.conv2d(x.detach(), w.detach(), None, kw.get("stride", 1), kw.get("padding", 0),
                                             kw.get("dilation", 1), kw.get("groups", 1))
            r = torch.randn_like(ref).requires_grad_()
        grad_step(F.conv2d(x, w, b, residual=r, act="relu", **kw))

    for layout in ("nchw", "channels_last"):
        conv((2, 3, 9, 11), (5, 3, 3, 3), layout, padding=1, residual=True)
        conv((2, 6, 14, 13), (16, 6, 5, 5), layout)
        conv((1, 4, 13, 17), (5, 4, 3, 3), layout, stride=2, padding=2, dilation=2)
        conv((2, 6, 7, 8), (6, 1, 3, 3), layout, padding=1, groups=6)
        conv((2, 8, 7, 7), (9, 8, 1, 1), layout, stride=2)
        conv((2, 20, 6, 5), (70, 20, 1, 1), layout, residual=True)
        conv((2, 17, 7, 6), (24, 17, 3, 2), layout, padding=(2, 1), dilation=(1, 2))  # input grad as a forward
        conv((2, 6, 9, 7), (8, 6, 3, 3), layout, padding=1)       # weight grad runs of whole kernel rows, borders
        conv((2, 3, 11, 10), (8, 3, 3, 2), layout, stride=(2, 1), padding=(1, 2), dilation=(2, 1))  # small taps, padded
        conv((3, 5, 19, 17), (16, 5, 3, 4), layout, padding=(2, 1), dilation=(1, 2))  # small taps, several splits
        conv((1, 9, 47, 45), (10, 9, 3, 3), layout, padding=1)  # weight grad in 2 pixel splits, rows reordered
        conv((2, 40, 17, 9), (16, 40, 1, 1), layout)  # 1x1 weight grad with the roles swapped
        conv((2, 20, 12, 12), (300, 20, 3, 3), layout, padding=1)  # weight grad: a task runs 3 row blocks
        conv((2, 3, 9, 8), (16, 3, 2, 2), layout, padding="same")  # small taps, bottom/right padding only
    conv((2, 1, 32, 30), (6, 1, 5, 5))                        # by channel, rows wider than a block
    conv((2, 2, 8, 9), (4, 1, 3, 3), groups=2, padding=1)     # by channel, groups
    conv((1, 3, 9, 8), (12, 1, 3, 3), groups=3)
    conv((2, 3, 9, 11), (5, 3, 3, 3), "channels_last", dtype=torch.bfloat16, padding=1)
    conv((2, 3, 9, 11), (5, 3, 3, 3), "nchw", dtype=torch.float64, padding=1)

    for rows, k, n in ((3, 300, 17), (1, 7, 2100), (20, 7, 9), (9, 9, 33), (5, 1, 3)):
        x = torch.randn(rows, k, requires_grad=True)
        w = torch.randn(n, k, requires_grad=True)
        grad_step(F.linear(x, w, torch.randn(n, requires_grad=True), act="tanh"))
        F.linear(x.detach(), w.detach().t().contiguous().t(), None, act="relu")

    for layout in ("nchw", "channels_last"):
        x = torch.randn(2, 10, 11, 9)
        if layout == "channels_last":
            x = x.contiguous(memory_format=cl)
        x.requires_grad_()
        grad_step(F.max_pool2d(x, 3, 2, 1))
        grad_step(F.max_pool2d(x, 2, ceil_mode=True))
        grad_step(F.avg_pool2d(x, 2))
        grad_step(F.avg_pool2d(x, 3, 1, 1, False, False))
        grad_step(F.global_avg_pool2d(x))
        grad_step(F.add_act(x, torch.randn_like(x)))
        grad_step(F.bias_act(x, torch.randn(10, requires_grad=True), act="tanh"))
        grad_step(F.local_response_norm(x, 5))
    print("memcheck script done")
""")

@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
@pytest.mark.heavy
def test_cpu_kernels_stay_in_bounds(tmp_path):
    if "cpu" not in fastcnn.available_backends("cpu"):
        pytest.skip("fastcnn._cpu is not built")
    script = tmp_path / "memcheck_script.py"
    script.write_text(SCRIPT)
    log = tmp_path / "memcheck.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONMALLOC="malloc", FASTCNN_BACKEND="cpu")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["valgrind", "--tool=memcheck", "--error-limit=no", "--num-callers=16",
                           f"--log-file={log}", sys.executable, str(script)],
                          env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "memcheck script done" in done.stdout
    # One record per error: from an "Invalid read/write" line to the next blank record line.
    records = re.split(r"\n==\d+== \n", log.read_text())
    ours = [r for r in records if re.search(r"Invalid (read|write)", r) and "_cpu.cpython" in r]
    assert not ours, "\n\n".join(ours[:3])
