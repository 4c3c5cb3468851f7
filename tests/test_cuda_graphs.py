"""fastcnn's GPU ops inside CUDA graphs: a fused model captured once (fastcnn.bench.graphs,
what `bench --cuda-graphs` times) and replayed on new input gives what the same model
gives run eagerly. Capture fails on a host sync, a launch on another stream or an
allocation the graph cannot own; a replay that reads stale buffers gives other numbers."""

import pytest
import torch

import fastcnn
import fastcnn.models as models
from fastcnn.bench import graphs
from conftest import assert_close_normwise

CUDA_BACKENDS = [b for b in ("triton", "cuda") if torch.cuda.is_available() and b in fastcnn.available_backends("cuda")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("net", ["resnet18", "googlenet", "lenet5"])
def test_graph_replay_matches_eager(backend, net):
    device = torch.device("cuda")
    torch.manual_seed(0)
    shape = (1, 32, 32) if net == "lenet5" else (3, 64, 64)
    model = models.get_model(net, num_classes=10).to(device, torch.float16).eval().fuse()
    model = model.to(memory_format=torch.channels_last)
    static_x = torch.randn(4, *shape, device=device, dtype=torch.float16).contiguous(
        memory_format=torch.channels_last)
    with fastcnn.use_backend(backend):
        def infer():
            with torch.no_grad():
                return model(static_x)
        replay = graphs.capture(infer, device)
        for _ in range(2):  # new input each time: the graph reads the static input's memory
            static_x.copy_(torch.randn_like(static_x))
            expected = infer().clone()
            got = replay()
            torch.cuda.synchronize()
            assert_close_normwise(got, expected, dtype=torch.float16)
