"""The classic networks whole (fastcnn.bench.networks): fastcnn's fused model
against the same network in eager PyTorch and its torch.compile, inference and a
training step, in one pytest-benchmark group per network, mode and batch. The
default `python -m fastcnn bench` reports the same as images per second."""

import pytest
import torch

from fastcnn.bench import networks
from conftest import DEVICE, DTYPE, synchronised

BATCHES = networks.default_batches(DEVICE)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("mode", networks.MODES)
@pytest.mark.parametrize("net", networks.DEFAULT_NETS)
def test_network(benchmark, implementation, net, mode, batch):
    benchmark.group = f"{net} {mode} batch {batch}"
    w = networks.workload(net, mode, batch, DTYPE, DEVICE)
    # eager in channels_last: on both this CPU and GPUs the faster of its two layouts for these nets
    name = implementation if implementation in ("eager", "compile") else "fastcnn"
    fn = synchronised(networks.contender(w, name))
    # the first call's result (a training step's loss: before any step) against eager's
    got = networks.first_result(fn)
    expected = networks.first_result(networks.contender(w, "eager"))
    assert networks.close(got, expected, DTYPE)
    benchmark.extra_info["images"] = batch
    benchmark.pedantic(fn, rounds=3 if batch > 1 or DEVICE.type == "cuda" else 10, warmup_rounds=1)
