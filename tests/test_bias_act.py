"""fastcnn::bias_act against torch: act(x + bias[c]) with the channel on dim 1,
forward and the fused backward (grad_x and the deterministic grad_bias)."""


import pytest
import torch

import fastcnn
from fastcnn import functional as F
from conftest import DTYPES, LAYOUTS, assert_close, assert_same_output_on_1_and_2_threads, make_input

ACTS = [None, "relu", "tanh", "sigmoid"]
# (N, C, H, W) with odd sizes, 1x1 images and C = 1 and 3; (N, C) as in an FC layer; (N, C, L).
SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 16, 13, 11), (5, 7, 1, 1), (2, 1, 4, 6), (4, 37), (2, 5, 3)]
TORCH_ACTS = {None: lambda v: v, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def channel_dims(t):
    return [d for d in range(t.dim()) if d != 1]


def bias_view(bias, x):
    return bias.view([1, -1] + [1] * (x.dim() - 2))


def reference(x, bias, act):
    """act(x + bias) computed in float32 (float64 for float64) and rounded once, as the kernels do."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return TORCH_ACTS[act](x.to(acc) + bias_view(bias.to(acc), x)).to(x.dtype)


def reference_backward(grad, out, act):
    """torch's own backward formulas, from the (rounded) output as torch's autograd uses it;
    grad_bias sums the unrounded float grad_x."""
    acc = torch.float64 if out.dtype == torch.float64 else torch.float32
    g, y = grad.to(acc), out.to(acc)
    gx = {None: lambda: g, "relu": lambda: torch.ops.aten.threshold_backward(g, y, 0),
          "tanh": lambda: torch.ops.aten.tanh_backward(g, y),
          "sigmoid": lambda: torch.ops.aten.sigmoid_backward(g, y)}[act]()
    return gx.to(out.dtype), gx.sum(channel_dims(gx)).to(out.dtype)


def make_bias(channels, dtype, device, requires_grad=True):
    return torch.randn(channels, dtype=torch.float32).to(device=device, dtype=dtype).requires_grad_(requires_grad)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward(backend_device, layout, shape, dtype, act):
    _, device = backend_device
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs 4 dimensions")
    x = make_input(shape, dtype, device, layout, requires_grad=True)
    bias = make_bias(shape[1], dtype, device)
    out = F.bias_act(x, bias, act)
    expected = reference(x.detach(), bias.detach(), act)
    assert_close(out, expected)
    if len(shape) == 4:
        assert out.is_contiguous(memory_format=fastcnn.ops.layout.memory_format_of(x))
    else:
        assert out.is_contiguous()

    grad = make_input(shape, dtype, device)
    out.backward(grad)
    expected_gx, expected_gb = reference_backward(grad, out.detach(), act)
    assert_close(x.grad, expected_gx)
    assert bias.grad.shape == bias.shape and bias.grad.dtype == dtype
    assert_close(bias.grad, expected_gb, scale=4)


@pytest.mark.parametrize("act", ACTS)
def test_matches_torch_autograd(backend_device, act):
    """Against the eager composition end to end (float32, PyTorch's own autograd)."""
    _, device = backend_device
    x = make_input((3, 6, 5, 4), torch.float32, device, requires_grad=True)
    bias = make_bias(6, torch.float32, device)
    x_ref, bias_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    grad = make_input((3, 6, 5, 4), torch.float32, device)
    F.bias_act(x, bias, act).backward(grad)
    TORCH_ACTS[act](x_ref + bias_view(bias_ref, x_ref)).backward(grad)
    assert_close(x.grad, x_ref.grad)
    assert_close(bias.grad, bias_ref.grad, scale=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, layout", [((4, 3, 100, 100), "nchw"), ((8, 3, 64, 64), "nchw"),
                                           ((2, 2, 150, 150), "nchw"), ((4, 300, 10, 10), "channels_last"),
                                           ((2000, 40), "nchw")], ids=str)
def test_many_partitions(backend_device, shape, layout, dtype):
    """Shapes large enough that the bias gradient is summed over several row blocks,
    channel blocks and splits; the result is the same bits on a second run."""
    _, device = backend_device
    x = make_input(shape, dtype, device, layout, seed=0)
    bias = make_bias(shape[1], dtype, device, requires_grad=False)
    out = F.bias_act(x, bias, "relu")
    assert_close(out, reference(x, bias, "relu"))
    grad = make_input(shape, dtype, device, seed=1)
    grad_x, grad_bias = torch.ops.fastcnn.bias_act_backward(grad, out, "relu")
    expected_gx, expected_gb = reference_backward(grad, out, "relu")
    assert_close(grad_x, expected_gx)
    assert_close(grad_bias, expected_gb, scale=10)
    again_x, again_bias = torch.ops.fastcnn.bias_act_backward(grad, out, "relu")
    assert torch.equal(again_x, grad_x) and torch.equal(again_bias, grad_bias)


SUM_SCRIPT = """
import sys, torch, fastcnn
g = torch.Generator().manual_seed(0)
x = torch.randn(4, 300, 10, 10, generator=g).contiguous(memory_format=torch.channels_last)
y = torch.randn(6, 3, 70, 70, generator=g)
with fastcnn.use_backend("cpu"):
    parts = [torch.ops.fastcnn.bias_act_backward(t, t, "tanh")[1] for t in (x, y)]
sys.stdout.write(torch.cat(parts).numpy().tobytes().hex())
"""


def test_cpu_grad_bias_independent_of_threads():
    """The partition is fixed by the shape: 1 and 2 OpenMP threads give the same bits."""
    if "cpu" not in fastcnn.available_backends("cpu"):
        pytest.skip("fastcnn._cpu is not built")
    assert_same_output_on_1_and_2_threads(SUM_SCRIPT)


def test_strided_bias(backend_device):
    """A bias that is a view with a stride (every other element of a parameter)."""
    _, device = backend_device
    x = make_input((2, 5, 3, 4), torch.float32, device, requires_grad=True)
    weights = torch.randn(10, device=device, requires_grad=True)
    bias = weights[::2]
    out = F.bias_act(x, bias, "sigmoid")
    assert_close(out, torch.sigmoid(x + bias_view(bias, x)))
    out.sum().backward()
    sigmoid_grad = out * (1 - out)
    assert_close(weights.grad[::2], sigmoid_grad.sum((0, 2, 3)), scale=4)
    assert torch.equal(weights.grad[1::2], torch.zeros(5, device=device))


def test_nan_propagates(backend_device):
    _, device = backend_device
    x = torch.randn(2, 3, 4, 4, device=device)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0] = float("-inf")
    x[1, 2, 1, 1] = float("inf")
    bias = torch.randn(3, device=device)
    bias[2] = float("nan")
    for act in ACTS:
        assert_close(F.bias_act(x, bias, act), TORCH_ACTS[act](x + bias_view(bias, x)), equal_nan=True)


def test_nan_output_passes_relu_gradient(backend_device):
    """As torch's threshold_backward: only out <= 0 blocks the gradient."""
    _, device = backend_device
    out = torch.tensor([[float("nan"), 0.0, 2.0], [-0.0, 1.0, float("nan")]], device=device)
    grad = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], device=device)
    grad_x, grad_bias = torch.ops.fastcnn.bias_act_backward(grad, out, "relu")
    expected = torch.ops.aten.threshold_backward(grad, out, 0)
    assert_close(grad_x, expected)
    assert_close(grad_bias, expected.sum(0))


def test_empty(backend_device):
    _, device = backend_device
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    bias = torch.randn(3, device=device, requires_grad=True)
    out = F.bias_act(x, bias)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(bias.grad, torch.zeros(3, device=device))
    no_channels = F.bias_act(torch.randn(2, 0, device=device), torch.randn(0, device=device), "tanh")
    assert no_channels.shape == (2, 0)


def test_expanded_gradient(backend_device):
    """`.sum().backward()` sends a gradient with zero strides."""
    _, device = backend_device
    x = make_input((2, 4, 3, 3), torch.float32, device, "channels_last", requires_grad=True)
    bias = make_bias(4, torch.float32, device)
    F.bias_act(x, bias).sum().backward()
    positive = (x + bias_view(bias, x) > 0).float()
    assert_close(x.grad, positive)
    assert_close(bias.grad, positive.sum((0, 2, 3)))


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck(backend):
    if backend not in fastcnn.available_backends("cpu"):
        pytest.skip(f"{backend} is not available")
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    x_cl = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    fc = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    bias3, bias7 = (torch.randn(c, dtype=torch.float64, requires_grad=True) for c in (3, 7))
    with fastcnn.use_backend(backend):
        for act in ACTS:
            assert torch.autograd.gradcheck(lambda a, b: F.bias_act(a, b, act), (x, bias3))
            assert torch.autograd.gradcheck(lambda a, b: F.bias_act(a, b, act), (x_cl.requires_grad_(), bias3))
            assert torch.autograd.gradcheck(lambda a, b: F.bias_act(a, b, act), (fc, bias7))
            assert torch.autograd.gradgradcheck(lambda a, b: F.bias_act(a, b, act), (x, bias3))


def test_opcheck():
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    bias = torch.randn(3, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcnn.bias_act, (x, bias, "relu"))
    torch.library.opcheck(torch.ops.fastcnn.bias_act,
                          (x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(), bias, "tanh"))
    torch.library.opcheck(torch.ops.fastcnn.bias_act, (torch.randn(4, 3, requires_grad=True), bias, None))
    grad, out = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4, 5)
    torch.library.opcheck(torch.ops.fastcnn.bias_act_backward, (grad, out, "relu"))
    torch.library.opcheck(torch.ops.fastcnn.bias_act_backward,
                          (grad, out.contiguous(memory_format=torch.channels_last), "sigmoid"))


def test_compile_fullgraph():
    def layer(x, bias):
        return F.bias_act(x * 2, bias, "relu") - 1

    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    bias = torch.randn(8, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x, bias)
    assert_close(out, layer(x, bias))
    out.sum().backward()
    positive = ((2 * x + bias_view(bias, x)) > 0).float()
    assert_close(x.grad, 2 * positive)
    assert_close(bias.grad, positive.sum((0, 2, 3)))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: ([1.0], torch.randn(1), "relu"), TypeError, "x must be a torch.Tensor"),
        (lambda: (torch.ones(2, 3, dtype=torch.int32), torch.randn(3), "relu"), TypeError, "x must be"),
        (lambda: (torch.randn(3), torch.randn(3), "relu"), ValueError, "x must have at least 2"),
        (lambda: (torch.randn(2, 3), None, "relu"), TypeError, "bias must be a torch.Tensor"),
        (lambda: (torch.randn(2, 3), torch.randn(1, 3), "relu"), ValueError, "bias must have 1 dimensions"),
        (lambda: (torch.randn(2, 3), torch.randn(4), "relu"), ValueError, "bias must have x.shape"),
        (lambda: (torch.randn(2, 3), torch.randn(3, dtype=torch.float64), "relu"), TypeError, "bias has dtype"),
        (lambda: (torch.randn(2, 3), torch.randn(3), "gelu"), ValueError, "act must be"),
    ],
)
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        F.bias_act(*make())
    args = make()
    if isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.Tensor):
        with pytest.raises(error, match=match):  # the op checks too, not only the functional
            torch.ops.fastcnn.bias_act(*args)
