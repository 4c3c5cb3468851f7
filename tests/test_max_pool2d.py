"""fastcnn::max_pool2d against torch.nn.functional.max_pool2d: values, indices
(exactly torch's), NaN semantics, layouts and the deterministic backward; and
fastcnn::max_pool2d_no_indices (inference), checked in the same grids."""

import math

import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as TF

import fastcnn
from fastcnn import functional as F
from fastcnn.ops.layout import memory_format_of
from conftest import DTYPES, LAYOUTS, assert_close, make_input

# (shape, kernel_size, stride, padding, dilation, ceil_mode)
CONFIGS = [
    ((2, 3, 7, 9), 3, 2, 1, 1, False),  # ResNet stem window on odd sizes
    ((2, 3, 7, 9), 3, 2, 1, 1, True),
    ((1, 1, 1, 1), 1, 1, 0, 1, False),  # 1x1 image
    ((3, 16, 8, 8), 2, 2, 0, 1, False),
    ((1, 3, 5, 5), 3, 1, 1, 1, False),  # stride 1: an element can win 9 windows
    ((2, 5, 13, 11), (3, 2), (2, 1), (1, 1), (2, 3), True),  # H != W, dilation, ceil_mode
    ((2, 4, 6, 7), 3, 3, 1, 1, True),  # ceil_mode with a part-window at the end
    ((1, 3, 17, 1), (2, 1), (2, 1), (1, 0), 1, False),  # W = 1
    # Long enough for the CPU kernel's vector blocks: channels (channels_last) or
    # interior columns (NCHW) in wide blocks, single vectors and an overlapping last one.
    ((1, 75, 4, 5), 3, 2, 1, 1, False),
    ((1, 2, 3, 70), 3, 1, 1, 1, False),
    ((1, 2, 5, 41), 3, 2, 1, 1, True),
]
CONFIG_IDS = [f"{'x'.join(map(str, c[0]))}-k{c[1]}-s{c[2]}-p{c[3]}-d{c[4]}-{'ceil' if c[5] else 'floor'}"
              for c in CONFIGS]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def fastcnn_pool(x, kernel, stride, padding, dilation, ceil_mode):
    """(output, indices) from the op itself: the functional form drops the indices."""
    return torch.ops.fastcnn.max_pool2d(x, list(pair(kernel)), list(pair(stride)), list(pair(padding)),
                                        list(pair(dilation)), ceil_mode)


def fastcnn_pool_no_indices(x, kernel, stride, padding, dilation, ceil_mode):
    return torch.ops.fastcnn.max_pool2d_no_indices(x, list(pair(kernel)), list(pair(stride)), list(pair(padding)),
                                                   list(pair(dilation)), ceil_mode)


def assert_no_indices_matches(x, out, *window):
    """The inference op gives the indices op's values (bit for bit, NaNs included) in its layout."""
    values = fastcnn_pool_no_indices(x.detach(), *window)
    assert torch.equal(values.isnan(), out.isnan())
    assert torch.equal(values.nan_to_num(), out.detach().nan_to_num())
    assert values.stride() == out.stride()


def windows_per_element(kernel, stride, dilation):
    """Most windows one element can win: the number of terms in its gradient."""
    (kh, kw), (sh, sw) = pair(kernel), pair(stride)
    return math.ceil(kh / sh) * math.ceil(kw / sw) if pair(dilation) == (1, 1) else kh * kw


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_forward_backward(backend_device, config, layout, dtype):
    _, device = backend_device
    shape, kernel, stride, padding, dilation, ceil_mode = config
    x = make_input(shape, dtype, device, layout, requires_grad=True)
    out, indices = fastcnn_pool(x, kernel, stride, padding, dilation, ceil_mode)
    ref_out, ref_indices = TF.max_pool2d(x.detach(), kernel, stride, padding, dilation, ceil_mode=ceil_mode,
                                         return_indices=True)
    assert torch.equal(indices, ref_indices)
    assert_close(out, ref_out)
    fmt = memory_format_of(x)
    assert out.is_contiguous(memory_format=fmt) and indices.is_contiguous(memory_format=fmt)
    assert_no_indices_matches(x, out, kernel, stride, padding, dilation, ceil_mode)

    grad = make_input(out.shape, dtype, device, layout)
    out.backward(grad)
    x64 = x.detach().double().requires_grad_(True)
    TF.max_pool2d(x64, kernel, stride, padding, dilation, ceil_mode=ceil_mode).backward(grad.double())
    assert_close(x.grad, x64.grad.to(dtype), dtype=dtype, scale=windows_per_element(kernel, stride, dilation))
    assert x.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_float64(backend_device, config, layout):
    _, device = backend_device
    shape, kernel, stride, padding, dilation, ceil_mode = config
    x = make_input(shape, torch.float64, device, layout, requires_grad=True)
    out, indices = fastcnn_pool(x, kernel, stride, padding, dilation, ceil_mode)
    ref_out, ref_indices = TF.max_pool2d(x.detach(), kernel, stride, padding, dilation, ceil_mode=ceil_mode,
                                         return_indices=True)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(out, ref_out)
    assert_no_indices_matches(x, out, kernel, stride, padding, dilation, ceil_mode)
    grad = make_input(out.shape, torch.float64, device, layout)
    out.backward(grad)
    x_ref = x.detach().clone().requires_grad_(True)
    TF.max_pool2d(x_ref, kernel, stride, padding, dilation, ceil_mode=ceil_mode).backward(grad)
    assert_close(x.grad, x_ref.grad, scale=windows_per_element(kernel, stride, dilation))


def test_functional_and_unbatched(backend_device):
    _, device = backend_device
    x = make_input((3, 10, 9), torch.float32, device)
    assert_close(F.max_pool2d(x, 3, 2, 1), TF.max_pool2d(x, 3, 2, 1))
    assert_close(F.max_pool2d(x, 2), TF.max_pool2d(x, 2))


def test_nan_and_ties(backend_device):
    """The first max wins a tie; a NaN beats everything and the last NaN in the window wins;
    an all -inf window points at its first in-bounds element. torch's answer comes from an
    NCHW copy: its CUDA kernel for channels_last points an all -inf window at element 0,
    which can lie outside the window."""
    _, device = backend_device
    x = torch.zeros(2, 3, 6, 6, device=device)  # every window a tie
    x[0, 0, 1, 1] = float("nan")
    x[0, 0, 2, 2] = float("nan")  # shares windows with (1, 1): the later one wins those
    x[0, 1, 0:3, 0:3] = float("nan")  # a window of NaNs
    x[0, 2] = float("-inf")
    x[1, 0, 3, 4] = float("inf")
    x[1, 1, ::2, ::2] = 1.0  # ties at several maxima
    for layout in ("nchw", "channels_last"):
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        for kernel, stride, padding, dilation in [(3, 2, 1, 1), (3, 1, 1, 1), (2, 2, 0, 1), (2, 1, 1, 2)]:
            out, indices = fastcnn_pool(x, kernel, stride, padding, dilation, False)
            ref_out, ref_indices = TF.max_pool2d(x.contiguous(), kernel, stride, padding, dilation,
                                                 return_indices=True)
            assert_close(out, ref_out, equal_nan=True)
            assert torch.equal(indices, ref_indices)
            assert_close(fastcnn_pool_no_indices(x, kernel, stride, padding, dilation, False), ref_out,
                         equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nan_and_ties_at_length(backend_device, layout, dtype):
    """As test_nan_and_ties on rows and channels long enough for the vector blocks:
    few distinct values (many ties) and scattered NaNs."""
    _, device = backend_device
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (1, 67, 5, 70), generator=gen).float()
    x[torch.rand(x.shape, generator=gen) < 0.05] = float("nan")
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for kernel, stride, padding, dilation in [(3, 2, 1, 1), (3, 1, 1, 1), (2, 2, 0, 1), (3, 1, 1, 2)]:
        out, indices = fastcnn_pool(x, kernel, stride, padding, dilation, False)
        ref_out, ref_indices = TF.max_pool2d(x, kernel, stride, padding, dilation, return_indices=True)
        assert_close(out, ref_out, equal_nan=True)
        assert torch.equal(indices, ref_indices)
        assert_close(fastcnn_pool_no_indices(x, kernel, stride, padding, dilation, False), ref_out, equal_nan=True)


def test_window_without_taps(backend_device):
    """A dilated window can hold no element of the input: -inf, at torch's index past the plane."""
    backend, device = backend_device
    x = torch.randn(1, 2, 1, 1, device=device, requires_grad=True)
    out, indices = fastcnn_pool(x, 2, 1, 1, 2, False)
    ref_out, ref_indices = TF.max_pool2d(x.detach(), 2, 1, 1, 2, return_indices=True)
    assert torch.equal(out, ref_out) and torch.equal(indices, ref_indices)
    assert torch.equal(fastcnn_pool_no_indices(x.detach(), 2, 1, 1, 2, False), ref_out)
    # torch's own backward writes at that index, past the plane: the torch backend masks it
    out.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    x = torch.randn(1, 2, 2, 5, device=device, requires_grad=True)  # empty windows beside full ones
    out, _ = fastcnn_pool(x, 2, 1, 1, 3, False)
    out.backward(torch.ones_like(out))
    ref = TF.max_pool2d(x.detach().double(), 2, 1, 1, 3)
    finite = torch.isfinite(ref)
    assert torch.equal(out[finite].double(), ref[finite]) and not finite.all()
    # each window with taps passes its 1 to an element of its own channel; the empty ones nothing
    assert torch.equal(x.grad.sum((2, 3)), finite.sum((2, 3)).to(x.grad.dtype))


def test_empty_batch(backend_device):
    _, device = backend_device
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    out, indices = fastcnn_pool(x, 3, 2, 1, 1, False)
    assert out.shape == indices.shape == fastcnn_pool_no_indices(x.detach(), 3, 2, 1, 1, False).shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_expanded_gradient(backend_device):
    """`.sum().backward()` sends a gradient with zero strides."""
    _, device = backend_device
    for layout in ("nchw", "channels_last"):
        x = make_input((2, 4, 7, 7), torch.float32, device, layout, requires_grad=True)
        F.max_pool2d(x, 3, 2, 1).sum().backward()
        x64 = x.detach().double().requires_grad_(True)
        TF.max_pool2d(x64, 3, 2, 1).sum().backward()
        assert_close(x.grad, x64.grad.float(), scale=4)


def test_backward_is_deterministic(backend_device):
    _, device = backend_device
    x = make_input((2, 8, 9, 9), torch.float16, device, "channels_last", requires_grad=True, seed=0)
    grad = make_input((2, 8, 9, 9), torch.float16, device, seed=1)
    grads = []
    for _ in range(2):
        x.grad = None
        F.max_pool2d(x, 3, 1, 1).backward(grad)
        grads.append(x.grad.clone())
    assert torch.equal(grads[0].view(torch.int16), grads[1].view(torch.int16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_backward_sums_in_torch_order(backend_device, layout, dtype):
    """Gradients are added in ascending output order, as PyTorch's CPU kernel adds them:
    float32 sums equal torch's bit for bit, and the CPU kernel's, which rounds after each
    add as torch does, also in 16 bits."""
    backend, device = backend_device
    if dtype != torch.float32 and backend != "cpu":
        pytest.skip("the gather kernels round once, after the sum")
    x = make_input((2, 9, 9, 11), dtype, device, layout, requires_grad=True, seed=0)
    grad = make_input((2, 9, 9, 11), dtype, device, layout, seed=1)
    F.max_pool2d(x, 3, 1, 1).backward(grad)
    x_cpu = x.detach().cpu().requires_grad_(True)
    TF.max_pool2d(x_cpu, 3, 1, 1).backward(grad.cpu())
    assert torch.equal(x.grad.cpu(), x_cpu.grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [((2, 2), (2, 2), (0, 0), False),  # VGG's pool; odd sizes: a row and column left over
                                    ((2, 2), (2, 2), (1, 1), False),  # padded
                                    ((3, 2), (3, 2), (1, 0), True)],  # part-windows at the end
                         ids=["2x2", "2x2_padded", "3x2_ceil"])
def test_backward_without_overlap(backend_device, window, dtype):
    """Windows that do not overlap (stride = kernel): each input element gets its window's
    gradient or zero, torch's bits (NaN passes; the sign of a zero aside: torch's CPU kernel
    turns -0.0 into +0.0, its CUDA kernel keeps it) over every channel count around a
    vector block, and a batch of one whose channels are split over threads."""
    _, device = backend_device
    kernel, stride, padding, ceil_mode = window
    for n, c in ((1, 75), (3, 8), (2, 5)):
        x = make_input((n, c, 11, 9), dtype, device, "channels_last", requires_grad=True, seed=c)
        out = TF.max_pool2d(x.detach(), kernel, stride, padding, ceil_mode=ceil_mode)
        grad = make_input(tuple(out.shape), dtype, device, "channels_last", seed=c + 1)
        flat = grad.permute(0, 2, 3, 1).view(-1)  # channels_last: a view in memory order
        flat[::7] = -0.0
        flat[3::11] = float("nan")
        fastcnn_pool(x, kernel, stride, padding, 1, ceil_mode)[0].backward(grad)
        x_ref = x.detach().clone().requires_grad_(True)
        TF.max_pool2d(x_ref, kernel, stride, padding, ceil_mode=ceil_mode).backward(grad)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x.grad.isnan(), x_ref.grad.isnan())
        bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
        # + 0.0 turns -0.0 into +0.0 and leaves every other value's bits as they are
        assert torch.equal((x.grad.nan_to_num() + 0.0).view(bits), (x_ref.grad.nan_to_num() + 0.0).view(bits))


def test_functional_picks_the_op(backend_device):
    """Without a gradient to compute, functional uses the op without indices; with
    one, the op with indices, whose backward works."""
    _, device = backend_device
    x = make_input((2, 5, 9, 8), torch.float32, device, "channels_last", requires_grad=True)
    expected = TF.max_pool2d(x.detach(), 3, 2, 1)
    calls = []
    with torch.no_grad(), _OpLog(calls):
        out = F.max_pool2d(x, 3, 2, 1)
    assert calls == ["fastcnn.max_pool2d_no_indices.default"]
    assert out.grad_fn is None and torch.equal(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    calls.clear()
    with _OpLog(calls):
        out = F.max_pool2d(x.detach(), 3, 2, 1)  # no input requires grad
        assert calls == ["fastcnn.max_pool2d_no_indices.default"]
        calls.clear()
        out = F.max_pool2d(x, 3, 2, 1)
    assert calls == ["fastcnn.max_pool2d.default"]
    assert out.grad_fn is not None and torch.equal(out.detach(), expected)
    out.sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    TF.max_pool2d(x64, 3, 2, 1).sum().backward()
    assert_close(x.grad, x64.grad.float(), scale=4)


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the fastcnn ops dispatched while it is active."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastcnn":
            self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


def test_no_indices_has_no_gradient():
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    out = torch.ops.fastcnn.max_pool2d_no_indices(x, [3, 3], [2, 2], [1, 1], [1, 1], False)
    with pytest.raises(RuntimeError, match="max_pool2d_no_indices has no gradient"):
        out.sum().backward()


def test_gradcheck():
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    for backend in ("cpu", "torch"):  # the Triton interpreter is too slow for gradcheck's many calls
        with fastcnn.use_backend(backend):
            assert torch.autograd.gradcheck(lambda t: F.max_pool2d(t, 3, 2, 1), (x,))
            assert torch.autograd.gradcheck(lambda t: F.max_pool2d(t, (2, 3), 1, (1, 0), (2, 1), True), (x,))
            assert torch.autograd.gradgradcheck(lambda t: F.max_pool2d(t, (2, 3), 1, (1, 0), (2, 1), True), (x,))


def test_opcheck():
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    window = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    torch.library.opcheck(torch.ops.fastcnn.max_pool2d, (x, *window))
    torch.library.opcheck(torch.ops.fastcnn.max_pool2d,
                          (x.contiguous(memory_format=torch.channels_last), [2, 3], [2, 1], [1, 0], [1, 2], True))
    out, indices = torch.ops.fastcnn.max_pool2d(x.detach(), *window)
    torch.library.opcheck(torch.ops.fastcnn.max_pool2d_backward, (torch.randn_like(out), indices, x.detach(), *window))
    # No gradient: checked on inputs that do not require one.
    torch.library.opcheck(torch.ops.fastcnn.max_pool2d_no_indices, (x.detach(), *window))
    torch.library.opcheck(torch.ops.fastcnn.max_pool2d_no_indices,
                          (x.detach().contiguous(memory_format=torch.channels_last), [2, 3], [2, 1], [1, 0], [1, 2],
                           True))


def test_compile_fullgraph():
    def block(x):
        return F.max_pool2d(x * 2, 3, 2, 1) + 1

    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    assert_close(out, TF.max_pool2d(x * 2, 3, 2, 1) + 1)
    out.sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    TF.max_pool2d(x64 * 2, 3, 2, 1).sum().backward()
    assert_close(x.grad, x64.grad.float(), scale=4)


def test_compile_fullgraph_inference():
    """Under no_grad the compiled graph holds the op without indices."""
    def block(x):
        return F.max_pool2d(x * 2, 3, 2, 1) + 1

    x = torch.randn(2, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(block, fullgraph=True, backend=counter)
    with torch.no_grad():
        out = compiled(x)
    assert_close(out, TF.max_pool2d(x * 2, 3, 2, 1) + 1)
    graph_ops = {str(node.target) for node in counter.graphs[0].graph.nodes}  # Dynamo's graph: op packets
    assert "fastcnn.max_pool2d_no_indices" in graph_ops and "fastcnn.max_pool2d" not in graph_ops


@pytest.mark.parametrize("return_indices", [False, True])
def test_module(backend_device, return_indices):
    _, device = backend_device
    args = dict(kernel_size=3, stride=2, padding=1, dilation=1, return_indices=return_indices, ceil_mode=True)
    ours, theirs = fastcnn.nn.MaxPool2d(**args), torch.nn.MaxPool2d(**args)
    assert repr(ours).replace("fastcnn", "torch") == repr(theirs).replace("torch.nn.modules.pooling.", "")
    for shape in [(2, 3, 10, 9), (3, 10, 9)]:
        x = make_input(shape, torch.float32, device)
        got, expected = ours(x), theirs(x)
        if return_indices:
            assert_close(got[0], expected[0])
            assert torch.equal(got[1], expected[1])
        else:
            assert_close(got, expected)
    assert fastcnn.nn.MaxPool2d(2).stride == 2


@pytest.mark.parametrize("kernel, padding, dilation", [(3, 1, 1), (2, 1, 1), (3, 2, 1), (3, 2, 2), (1, 1, 1),
                                                       ((3, 5), (1, 2), 1), ((3, 5), (2, 2), 1)])
def test_padding_rule_matches_torch(kernel, padding, dilation):
    x = torch.randn(1, 1, 9, 9)
    try:
        expected = TF.max_pool2d(x, kernel, 1, padding, dilation)
    except RuntimeError:
        with pytest.raises(ValueError, match="padding"):
            F.max_pool2d(x, kernel, 1, padding, dilation)
    else:
        assert_close(F.max_pool2d(x, kernel, 1, padding, dilation), expected)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(1, 2, 5, 5), 0), ValueError, "kernel_size"),
        (lambda: (torch.randn(1, 2, 5, 5), "3"), TypeError, "kernel_size"),
        (lambda: (torch.randn(1, 2, 5, 5), 3, 0), ValueError, "stride"),
        (lambda: (torch.randn(1, 2, 5, 5), 3, 1, 2), ValueError, "padding"),
        (lambda: (torch.randn(1, 2, 5, 5), 3, 1, -1), ValueError, "padding"),
        (lambda: (torch.randn(1, 2, 5, 5), 3, 1, 0, 0), ValueError, "dilation"),
        (lambda: (torch.randn(1, 2, 5, 5), 3, 1, 0, 1, 1), TypeError, "ceil_mode"),
        (lambda: (torch.randn(1, 2, 2, 2), 3), ValueError, "too small"),
        (lambda: (torch.randn(5, 5), 3), ValueError, "input must have"),
        (lambda: (torch.ones(1, 2, 5, 5, dtype=torch.int32), 3), TypeError, "input must be"),
        (lambda: ([[1.0]], 3), TypeError, "input must be a torch.Tensor"),
    ],
)
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        F.max_pool2d(*make())


def test_bad_op_input():
    window = ([3, 3], [2, 2], [1, 1], [1, 1], False)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="input must have non-zero"):
        torch.ops.fastcnn.max_pool2d(torch.randn(2, 0, 8, 8), *window)
    with pytest.raises(ValueError, match="input must have non-zero"):
        torch.ops.fastcnn.max_pool2d_no_indices(torch.randn(2, 0, 8, 8), *window)
    with pytest.raises(ValueError, match="stride"):
        torch.ops.fastcnn.max_pool2d_no_indices(x, [3, 3], [0, 2], [1, 1], [1, 1], False)
    out, indices = torch.ops.fastcnn.max_pool2d(x, *window)
    backward = torch.ops.fastcnn.max_pool2d_backward
    with pytest.raises(ValueError, match="grad_output has shape"):
        backward(torch.randn(2, 3, 5, 5), indices, x, *window)
    with pytest.raises(TypeError, match="grad_output has dtype"):
        backward(out.double(), indices, x, *window)
    with pytest.raises(TypeError, match="indices must be int64"):
        backward(out, indices.int(), x, *window)
    with pytest.raises(ValueError, match="indices has shape"):
        backward(out, indices[:1], x, *window)
