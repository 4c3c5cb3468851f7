"""The layer set the conv/GEMM tests and benchmarks cover (fastcnn/bench/layers.py)."""

import pytest
import torch

from fastcnn.bench.layers import NETWORKS, ConvLayer, conv_layers, distinct_layers, linear_layers

# torchvision's documented "GFLOPS" (multiply-adds) at 224x224 for networks whose layers are all distinct.
TORCHVISION_GMACS = {"alexnet": 0.71, "googlenet": 1.50}


@pytest.mark.parametrize("net, gmacs", TORCHVISION_GMACS.items())
def test_multiply_adds_match_torchvision(net, gmacs):
    layers = NETWORKS[net]()
    total = sum(layer.macs / layer.batch for layer in layers)
    assert abs(total / 1e9 - gmacs) / gmacs < 0.01


def test_layer_output_sizes_match_torch():
    """Each conv layer's output size is the one PyTorch computes for its geometry."""
    for net, build in NETWORKS.items():
        for layer in build():
            if isinstance(layer, ConvLayer):
                x = torch.empty(1, layer.in_channels, *layer.size, device="meta")
                w = torch.empty(layer.out_channels, layer.in_channels // layer.groups, layer.kernel, layer.kernel,
                                device="meta")
                y = torch.nn.functional.conv2d(x, w, None, layer.stride, layer.padding, 1, layer.groups)
                assert tuple(y.shape[2:]) == layer.out_size, (net, layer.name)


def test_distinct_layers_are_distinct():
    layers = distinct_layers()
    assert len({layer.key for layer in layers}) == len(layers)
    assert len(conv_layers()) + len(linear_layers()) == len(layers)
    # The ResNet stem appears once although both ResNets have it.
    assert sum(1 for layer in conv_layers() if layer.kernel == 7 and layer.in_channels == 3) == 1
