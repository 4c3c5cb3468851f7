"""avg_pool2d against eager F.avg_pool2d and its torch.compile: the 2x2/2 downsampling
(DenseNet transitions) and Inception's 3x3/1 pad 1 branch pooling, in both layouts."""

import pytest
import torch
import torch.nn.functional as TF

from fastcnn import functional as F
from conftest import BATCH, activation, pick

# (label, kernel_size, stride, padding, count_include_pad)
WINDOWS = [("2x2s2", 2, 2, 0, True), ("3x3s1p1", 3, 1, 1, False)]
SHAPES = [(BATCH, 256, 56, 56)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("window", WINDOWS, ids=[w[0] for w in WINDOWS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_avg_pool2d(benchmark, implementation, shape, window, channels_last):
    label, kernel, stride, padding, count_include_pad = window
    benchmark.group = (f"avg_pool2d {label} {'x'.join(map(str, shape))} "
                       f"{'channels_last' if channels_last else 'nchw'}")
    x = activation(shape, channels_last)
    fn = pick(implementation,
              lambda t: TF.avg_pool2d(t, kernel, stride, padding, count_include_pad=count_include_pad),
              lambda t: F.avg_pool2d(t, kernel, stride, padding, count_include_pad=count_include_pad))
    out = benchmark(fn, x)
    torch.testing.assert_close(out, TF.avg_pool2d(x, kernel, stride, padding, count_include_pad=count_include_pad))
