"""max_pool2d 3x3/2 pad 1 (the ResNet stem's pooling, and the same window on a wider
activation) against eager F.max_pool2d and its torch.compile, in both layouts:
the forward alone (inference) and forward + backward (a training step).

Under no_grad fastcnn's functional form keeps no indices (fastcnn::max_pool2d_no_indices);
the forward group also times the op with indices, as a training forward runs it."""

import pytest
import torch
import torch.nn.functional as TF

from fastcnn import functional as F
from conftest import BATCH, activation, pick, synchronised

SHAPES = [(BATCH, 256, 56, 56), (BATCH, 64, 112, 112)]
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
SHAPE_IDS = lambda s: "x".join(map(str, s))  # noqa: E731


def eager_pool(t):
    return TF.max_pool2d(t, 3, 2, 1)


def fastcnn_pool(t):
    return F.max_pool2d(t, 3, 2, 1)


def fastcnn_pool_with_indices(t):
    return torch.ops.fastcnn.max_pool2d(t, [3, 3], [2, 2], [1, 1], [1, 1], False)[0]


def group(kind, shape, channels_last):
    return f"max_pool2d 3x3s2p1 {kind} {'x'.join(map(str, shape))} {'channels_last' if channels_last else 'nchw'}"


@LAYOUTS
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_max_pool2d_forward(benchmark, implementation, shape, channels_last):
    benchmark.group = group("forward", shape, channels_last)
    x = activation(shape, channels_last)
    out = benchmark(pick(implementation, eager_pool, fastcnn_pool), x)
    torch.testing.assert_close(out, eager_pool(x))


@LAYOUTS
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_max_pool2d_forward_with_indices(benchmark, implementation, shape, channels_last):
    if implementation in ("eager", "compile"):
        pytest.skip("timed in test_max_pool2d_forward")
    benchmark.group = group("forward", shape, channels_last)
    x = activation(shape, channels_last)
    out = benchmark(synchronised(fastcnn_pool_with_indices), x)
    torch.testing.assert_close(out, eager_pool(x))


@LAYOUTS
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_max_pool2d_forward_backward(benchmark, implementation, shape, channels_last):
    benchmark.group = group("forward+backward", shape, channels_last)
    x = activation(shape, channels_last).requires_grad_(True)
    grad = activation((shape[0], shape[1], shape[2] // 2, shape[3] // 2), channels_last)
    forward = pick(implementation, eager_pool, fastcnn_pool)

    def step(t, g):
        with torch.enable_grad():
            return torch.autograd.grad(forward(t), t, g)[0]

    grad_input = benchmark(synchronised(step), x, grad)
    with torch.enable_grad():
        expected = torch.autograd.grad(eager_pool(x), x, grad)[0]
    torch.testing.assert_close(grad_input, expected)
