"""fastcnn.ops.direct: eager calls that need no autograd, tracing or mode run the
op's body without the dispatcher; everything else goes through the op."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastcnn import functional as F
from fastcnn.ops import direct
from conftest import dispatched_ops


def dispatcher_needed(args) -> bool:
    """What direct.call decides: None (a mode, a tensor that is not plain) or True (autograd
    records the call, through the op or its Function) is not the bare body."""
    return direct.grad_wanted(args) is not False


def test_plain_inference_calls_skip_the_dispatcher():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    assert not dispatcher_needed((x, w, None))
    with torch.no_grad():
        assert not dispatcher_needed((x, w.requires_grad_(), None))
    assert not dispatcher_needed((x, torch.nn.Parameter(w, requires_grad=False)))


def test_everything_else_goes_through_the_op():
    x = torch.randn(2, 3, 8, 8)
    assert dispatcher_needed((x, torch.randn(3, requires_grad=True)))  # autograd
    assert dispatcher_needed((torch.empty(2, 3, device="meta"),))  # meta tensors: the fake runs
    with torch.device("cpu"):  # a TorchFunctionMode
        assert dispatcher_needed((x,))

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert dispatcher_needed((x,))
    with torch.autograd.profiler.profile():
        assert dispatcher_needed((x,))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(x)
    assert dispatcher_needed((fake,))
    seen = []
    torch.vmap(lambda t: seen.append(dispatcher_needed((t,))) or t)(x)
    assert seen == [True]


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # argument checks read shapes
def test_jit_trace_records_the_ops():
    """torch.jit.trace records only what reaches the dispatcher: a body run directly
    would leave its kernel out, and the traced function would return an uninitialised
    tensor. Traced calls go through the ops, so the trace computes the same results on
    new inputs."""
    w, b, fc = torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(5, 4)

    def net(x):
        y = F.max_pool2d(F.conv2d(x, w, b, padding=1, act="relu"), 2)
        return F.linear(F.global_avg_pool2d(y).flatten(1), fc, act="tanh")

    with torch.no_grad():
        traced = torch.jit.trace(net, torch.randn(2, 3, 8, 8))
        x = torch.randn(2, 3, 8, 8)
        assert torch.equal(traced(x), net(x))
    graph = str(traced.graph)
    assert all(f"fastcnn::{op}" in graph for op in ("conv2d", "max_pool2d_no_indices", "global_avg_pool2d", "linear"))


def test_direct_and_dispatched_calls_agree_and_ops_stay_visible():
    x, w, b = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3), torch.randn(4)
    with torch.no_grad():
        direct_out = F.conv2d(x, w, b, padding=1, act="relu")
    dispatched_out, ops = dispatched_ops(lambda: F.conv2d(x, w, b, padding=1, act="relu"))
    assert ops == ["fastcnn.conv2d"]  # under a dispatch mode the op shows up as one call
    assert torch.equal(direct_out, dispatched_out)
    out = torch.randn(2, 10, 9, 9)
    with torch.no_grad():
        F.conv2d(x, w, b, padding=1, act="relu", out=out, channel_offset=6)
    assert torch.equal(out[:, 6:], direct_out)


def test_calls_needing_a_gradient_run_the_ops_formulas_without_the_dispatcher():
    """Where a gradient is wanted, direct.call applies a torch.autograd.Function made of
    the op's registered backward: same outputs and gradients as the op itself."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 9, generator=gen, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=gen, requires_grad=True)
    b = torch.randn(4, generator=gen, requires_grad=True)
    r = torch.randn(2, 4, 9, 9, generator=gen, requires_grad=True)
    y = F.conv2d(x, w, b, padding=1, residual=r, act="tanh")
    assert type(y.grad_fn).__name__ == "fastcnn_conv2d_functionBackward"
    via_op = torch.ops.fastcnn.conv2d(x, w, b, r, [1, 1], [1, 1, 1, 1], [1, 1], 1, "tanh")
    assert type(via_op.grad_fn).__name__ != type(y.grad_fn).__name__
    assert torch.equal(y, via_op)
    g = torch.randn(y.shape, generator=gen)
    for got, expected in zip(torch.autograd.grad(y, (x, w, b, r), g), torch.autograd.grad(via_op, (x, w, b, r), g)):
        assert torch.equal(got, expected)
    with torch.device("cpu"):  # a mode: the op itself
        assert type(F.conv2d(x, w, b, padding=1).grad_fn).__name__ != type(y.grad_fn).__name__


def test_double_backward_through_the_direct_function():
    x = torch.randn(2, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: F.avg_pool2d(t, 3, 2, 1), (x,))
    assert torch.autograd.gradgradcheck(lambda t: F.global_avg_pool2d(t), (x,))
