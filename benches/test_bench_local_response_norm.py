"""local_response_norm against eager F.local_response_norm and its torch.compile: AlexNet's
two LRN layers (96 channels of 55x55, 256 of 27x27) and a large feature map, in both
layouts; forward, and forward + backward for AlexNet's layers."""

import pytest
import torch
import torch.nn.functional as TF

from fastcnn import functional as F
from conftest import BATCH, DTYPE, activation, pick

ALEXNET_SHAPES = [(BATCH, 96, 55, 55), (BATCH, 256, 27, 27)]
SHAPES = [*ALEXNET_SHAPES, (BATCH, 256, 56, 56)]
# AlexNet's hyper-parameters (size 5, alpha 1e-4, beta 0.75, k 2).
PARAMS = (5, 1e-4, 0.75, 2.0)
TOL = 1e-4 if DTYPE == torch.float32 else 2e-2


def _name(shape, channels_last):
    return f"{'x'.join(map(str, shape))} {'channels_last' if channels_last else 'nchw'}"


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_local_response_norm(benchmark, implementation, shape, channels_last):
    benchmark.group = f"local_response_norm {_name(shape, channels_last)}"
    x = activation(shape, channels_last)
    fn = pick(implementation, lambda t: TF.local_response_norm(t, *PARAMS), lambda t: F.local_response_norm(t, *PARAMS))
    out = benchmark(fn, x)
    torch.testing.assert_close(out, TF.local_response_norm(x, *PARAMS), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", ALEXNET_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_local_response_norm_forward_backward(benchmark, implementation, shape, channels_last):
    benchmark.group = f"local_response_norm fwd+bwd {_name(shape, channels_last)}"
    x = activation(shape, channels_last).requires_grad_(True)
    grad = activation(shape, channels_last)

    def step(lrn):
        def run(t, g):
            (gx,) = torch.autograd.grad(lrn(t, *PARAMS), t, g)
            return gx
        return run

    with torch.enable_grad():
        fn = pick(implementation, step(TF.local_response_norm), step(F.local_response_norm))
        got = benchmark(fn, x, grad)
        expected = step(TF.local_response_norm)(x, grad)
    torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)
