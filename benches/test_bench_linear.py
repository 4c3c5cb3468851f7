"""Every distinct fully connected layer of the classic networks, forward and
forward + backward: fastcnn's GEMM with its fused bias + ReLU against eager
F.linear followed by ReLU, and its torch.compile."""

import pytest

from fastcnn.bench.layer_cases import linear_case
from fastcnn.bench.layers import linear_layers
from conftest import on_device, run_layer_case


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("layer", linear_layers(), ids=lambda l: l.label)
def test_linear_layer(benchmark, implementation, layer, backward):
    run_layer_case(benchmark, implementation, linear_case(on_device(layer), backward=backward))
