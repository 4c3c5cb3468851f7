"""add_act against eager `torch.relu(a + b)` and its torch.compile."""

import pytest
import torch

from fastcnn import functional as F
from conftest import BATCH, activation, pick

SHAPES = [(BATCH, 256, 56, 56), (BATCH, 64, 112, 112)]


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_add_act_relu(benchmark, implementation, shape, channels_last):
    benchmark.group = f"add_act relu {'x'.join(map(str, shape))} {'channels_last' if channels_last else 'nchw'}"
    a, b = activation(shape, channels_last), activation(shape, channels_last)
    fn = pick(implementation, lambda x, y: torch.relu(x + y), lambda x, y: F.add_act(x, y, "relu"))
    out = benchmark(fn, a, b)
    torch.testing.assert_close(out, torch.relu(a + b))
