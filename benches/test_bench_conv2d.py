"""Every distinct convolution of LeNet-5, AlexNet, VGG-16, ResNet-18/50 and GoogLeNet
(fastcnn/bench/layers.py), forward and forward + backward: fastcnn's fused
conv + bias + ReLU against eager conv followed by the separate ops, and its
torch.compile, in one pytest-benchmark group per layer. Select with -k (a layer's
network name, "fwd" or "bwd"): the whole set takes a while."""

import pytest

from fastcnn.bench.layer_cases import conv_case
from fastcnn.bench.layers import conv_layers
from conftest import on_device, run_layer_case


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("layer", conv_layers(), ids=lambda l: l.label)
def test_conv2d_layer(benchmark, implementation, layer, backward):
    run_layer_case(benchmark, implementation, conv_case(on_device(layer), channels_last=True, backward=backward))
