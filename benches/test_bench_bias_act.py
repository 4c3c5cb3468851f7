"""bias_act against eager `act(x + bias.view(...))` and its torch.compile, and the
fused backward against eager's threshold_backward + sum."""

import pytest
import torch

from fastcnn import functional as F
from conftest import BATCH, DEVICE, DTYPE, activation, pick

CONV = (BATCH, 256, 56, 56)
FC = (256, 4096)
ACTS = {"relu": torch.relu, "tanh": torch.tanh}


def label(shape, channels_last=False):
    return f"{'x'.join(map(str, shape))} {'channels_last' if channels_last else 'nchw' if len(shape) == 4 else ''}"


def bias_for(shape):
    return torch.randn(shape[1], device=DEVICE, dtype=DTYPE)


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bias_act_conv(benchmark, implementation, channels_last, act):
    benchmark.group = f"bias_act {act} {label(CONV, channels_last)}"
    x, bias = activation(CONV, channels_last), bias_for(CONV)
    eager = lambda x, b: ACTS[act](x + b.view(1, -1, 1, 1))  # noqa: E731
    fn = pick(implementation, eager, lambda x, b: F.bias_act(x, b, act))
    out = benchmark(fn, x, bias)
    torch.testing.assert_close(out, eager(x, bias))


def test_bias_act_fc(benchmark, implementation):
    benchmark.group = f"bias_act relu {label(FC)}"
    x, bias = activation(FC), bias_for(FC)
    eager = lambda x, b: torch.relu(x + b)  # noqa: E731
    fn = pick(implementation, eager, lambda x, b: F.bias_act(x, b, "relu"))
    out = benchmark(fn, x, bias)
    torch.testing.assert_close(out, eager(x, bias))


def eager_backward(grad, out):
    grad_x = torch.ops.aten.threshold_backward(grad, out, 0)
    return grad_x, grad_x.sum([d for d in range(grad_x.dim()) if d != 1])


@pytest.mark.parametrize("shape, channels_last", [(CONV, False), (CONV, True), (FC, False)],
                         ids=["conv-nchw", "conv-channels_last", "fc"])
def test_bias_act_backward(benchmark, implementation, shape, channels_last):
    benchmark.group = f"bias_act_backward relu {label(shape, channels_last)}"
    out = torch.relu(activation(shape, channels_last))
    grad = activation(shape, channels_last)
    fn = pick(implementation, eager_backward, lambda g, y: torch.ops.fastcnn.bias_act_backward(g, y, "relu"))
    grad_x, grad_bias = benchmark(fn, grad, out)
    expected_x, expected_bias = eager_backward(grad, out)
    torch.testing.assert_close(grad_x, expected_x)
    torch.testing.assert_close(grad_bias, expected_bias, rtol=1e-4, atol=1e-3)
