"""global_avg_pool2d against eager F.adaptive_avg_pool2d(x, 1) and its torch.compile:
the ResNet-50 head (2048 channels of 7x7) and a large early feature map, in both layouts."""

import pytest
import torch
import torch.nn.functional as TF

from fastcnn import functional as F
from conftest import BATCH, activation, pick

SHAPES = [(BATCH, 2048, 7, 7), (BATCH, 256, 56, 56)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_global_avg_pool2d(benchmark, implementation, shape, channels_last):
    benchmark.group = f"global_avg_pool2d {'x'.join(map(str, shape))} {'channels_last' if channels_last else 'nchw'}"
    x = activation(shape, channels_last)
    fn = pick(implementation, lambda t: TF.adaptive_avg_pool2d(t, 1), F.global_avg_pool2d)
    out = benchmark(fn, x)
    torch.testing.assert_close(out, TF.adaptive_avg_pool2d(x, 1))
