"""fastcnn::local_response_norm against torch.nn.functional.local_response_norm, forward and backward."""

import pytest
import torch
import torch.nn.functional as TF

import fastcnn
import fastcnn.nn.local_response_norm as lrn_nn
from fastcnn import functional as F
from fastcnn.ops.layout import memory_format_of
from conftest import DTYPES, LAYOUTS, assert_close, assert_same_output_on_1_and_2_threads, make_input

# C = 1 and 3 (smaller than most windows), prime sizes, H != W, 1x1 images.
SHAPES = [(2, 7, 5, 6), (1, 1, 1, 1), (3, 3, 13, 11), (2, 16, 1, 3)]
# (size, alpha, beta, k): AlexNet's odd window (alpha large enough that the normalisation
# matters), an even window with a beta that takes pow, and a window wider than C.
PARAMS = [(5, 0.5, 0.75, 2.0), (4, 1.0, 1.3, 1.5), (7, 0.3, 0.75, 1.0)]


def reference(x, grad, size, alpha, beta, k):
    """Output and input gradient from PyTorch's own function, in float64, rounded to x's dtype."""
    x64 = x.detach().double().requires_grad_(True)
    y = TF.local_response_norm(x64, size, alpha, beta, k)
    (g,) = torch.autograd.grad(y, x64, grad.double())
    return y.detach().to(x.dtype), g.to(x.dtype)


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: "size{}-beta{}".format(p[0], p[2]))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward(backend_device, layout, shape, dtype, params):
    _, device = backend_device
    x = make_input(shape, dtype, device, layout, requires_grad=True)
    out = F.local_response_norm(x, *params)
    grad = make_input(shape, dtype, device, layout)
    expected, expected_grad = reference(x, grad, *params)
    assert_close(out, expected)
    assert out.is_contiguous(memory_format=memory_format_of(x))
    out.backward(grad)
    assert_close(x.grad, expected_grad)
    assert x.grad.is_contiguous(memory_format=memory_format_of(x))


@pytest.mark.parametrize("size", [1, 2, 3, 5, 6, 9])
def test_float64_window_sizes(backend_device, size):
    """Every window size, odd and even, up to wider than C, against torch to float64 precision."""
    _, device = backend_device
    x = make_input((2, 6, 3, 4), torch.float64, device, requires_grad=True)
    grad = make_input((2, 6, 3, 4), torch.float64, device)
    out = F.local_response_norm(x, size, 0.7, 0.75 if size % 2 else 0.6, 1.2)
    expected, expected_grad = reference(x, grad, size, 0.7, 0.75 if size % 2 else 0.6, 1.2)
    assert_close(out, expected)
    out.backward(grad)
    assert_close(x.grad, expected_grad)


def test_default_arguments(backend_device):
    _, device = backend_device
    x = make_input((2, 96, 5, 5), torch.float32, device, "channels_last") * 30
    assert_close(F.local_response_norm(x, 5), TF.local_response_norm(x.double(), 5).float())


def test_unbatched_and_higher_dims(backend_device):
    """(N, C, L) and (N, C, D, H, W) normalise across dim 1, as torch's function does."""
    _, device = backend_device
    for shape in [(2, 5, 7), (2, 5, 3, 2, 4)]:
        x = make_input(shape, torch.float32, device, requires_grad=True)
        out = F.local_response_norm(x, 3, 0.5, 0.75, 1.0)
        expected, expected_grad = reference(x, torch.ones(shape, device=device), 3, 0.5, 0.75, 1.0)
        assert out.shape == x.shape
        assert_close(out, expected)
        out.sum().backward()
        assert_close(x.grad, expected_grad)


def test_module_matches_torch(backend_device):
    _, device = backend_device
    ours, theirs = lrn_nn.LocalResponseNorm(5, 0.5, 0.75, 2.0), torch.nn.LocalResponseNorm(5, 0.5, 0.75, 2.0)
    assert repr(ours) == repr(theirs)
    assert ours.state_dict() == theirs.state_dict() == {}
    x = make_input((2, 8, 4, 4), torch.float32, device)
    assert_close(ours(x), theirs(x.double()).float())


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the Triton interpreter's numpy
def test_nan_propagates(backend_device):
    """A NaN reaches every output whose window holds it; an inf gives NaN in its own channel
    and 0 in its neighbours' (x / inf), as in torch."""
    _, device = backend_device
    x = torch.randn(2, 9, 3, 3, device=device)
    x[0, 4, 1, 1] = float("nan")
    x[1, 2, 0, 2] = float("inf")
    x.requires_grad_(True)
    ref_x = x.detach().clone().requires_grad_(True)
    out = F.local_response_norm(x, 3, 0.5, 0.75, 1.0)
    expected = TF.local_response_norm(ref_x, 3, 0.5, 0.75, 1.0)
    assert_close(out, expected, equal_nan=True)
    assert out[0, 3:6, 1, 1].isnan().all() and not out[0, 2, 1, 1].isnan()
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert_close(x.grad, ref_x.grad, equal_nan=True)


def test_empty_batch(backend_device):
    _, device = backend_device
    x = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    out = F.local_response_norm(x, 5)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_expanded_gradient(backend_device):
    """`.sum().backward()` sends a gradient with zero strides."""
    _, device = backend_device
    x = make_input((2, 6, 3, 3), torch.float32, device, "channels_last", requires_grad=True)
    F.local_response_norm(x, 5, 0.5, 0.75, 2.0).sum().backward()
    _, expected_grad = reference(x, torch.ones(2, 6, 3, 3, device=device), 5, 0.5, 0.75, 2.0)
    assert_close(x.grad, expected_grad)


def test_gradcheck():
    x = torch.randn(2, 5, 3, 2, dtype=torch.float64, requires_grad=True)
    for backend in fastcnn.available_backends("cpu"):
        with fastcnn.use_backend(backend):
            for size, beta in [(3, 0.75), (4, 1.3), (7, 0.75)]:
                assert torch.autograd.gradcheck(lambda t: F.local_response_norm(t, size, 0.8, beta, 1.5), (x,))
            if backend != "triton":  # the interpreter is too slow for gradgradcheck's many calls
                assert torch.autograd.gradgradcheck(lambda t: F.local_response_norm(t, 3, 0.8, 0.75, 1.5), (x,))


def test_third_derivative_matches_torch():
    """The double backward keeps its graph where a further derivative is taken: the
    third derivative matches torch's LRN (detached, it would be constant there)."""
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)

    def third(fn):
        g1, = torch.autograd.grad(fn(x).pow(2).sum(), x, create_graph=True)
        g2, = torch.autograd.grad(g1.pow(2).sum(), x, create_graph=True)
        return torch.autograd.grad(g2.pow(2).sum(), x)[0]

    with fastcnn.use_backend("cpu"):
        got = third(lambda t: F.local_response_norm(t, 3, 0.8, 0.75, 1.5))
    assert_close(got, third(lambda t: TF.local_response_norm(t, 3, 0.8, 0.75, 1.5)))


def test_same_bits_on_1_and_2_threads():
    assert_same_output_on_1_and_2_threads(
        "import torch, fastcnn; from fastcnn import functional as F\n"
        "torch.manual_seed(0); x = torch.randn(4, 24, 17, 19, requires_grad=True)\n"
        "with fastcnn.use_backend('cpu'):\n"
        "    y = F.local_response_norm(x, 5, 0.5, 0.75, 2.0); y.backward(torch.randn_like(y))\n"
        "print(y.sum().item().hex(), x.grad.sum().item().hex(), y.pow(2).sum().item().hex())\n")


def test_opcheck():
    x = torch.randn(2, 6, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcnn.local_response_norm, (x, 5, 0.5, 0.75, 2.0))
    torch.library.opcheck(torch.ops.fastcnn.local_response_norm,
                          (x.contiguous(memory_format=torch.channels_last), 4, 1e-4, 1.3, 1.0))
    grad = torch.randn(2, 6, 4, 5)
    torch.library.opcheck(torch.ops.fastcnn.local_response_norm_backward, (grad, x.detach(), 5, 0.5, 0.75, 2.0))


def test_compile_fullgraph(backend_device):
    _, device = backend_device

    def block(t):
        return F.local_response_norm(torch.relu(t), 5, 0.5, 0.75, 2.0) * 2

    x = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    out = torch.compile(block, fullgraph=True)(x)
    expected = TF.local_response_norm(torch.relu(ref_x), 5, 0.5, 0.75, 2.0) * 2
    assert_close(out, expected)
    out.sum().backward()
    expected.sum().backward()
    assert_close(x.grad, ref_x.grad)


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.randn(2, 3), 5), ValueError, "input must have 3 or more"),
        ((torch.ones(2, 3, 4, 4, dtype=torch.int32), 5), TypeError, "input must be"),
        (([1.0], 5), TypeError, "input must be a torch.Tensor"),
        ((torch.randn(2, 3, 4, 4), 0), ValueError, "size must be positive"),
        ((torch.randn(2, 3, 4, 4), 2.0), TypeError, "size must be an int"),
        ((torch.randn(2, 3, 4, 4), True), TypeError, "size must be an int"),
        ((torch.randn(2, 3, 4, 4), 5, "0.1"), TypeError, "alpha must be a real number"),
        ((torch.randn(2, 3, 4, 4), 5, 1e-4, None), TypeError, "beta must be a real number"),
        ((torch.randn(2, 3, 4, 4), 5, 1e-4, 0.75, torch.tensor(1.0)), TypeError, "k must be a real number"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        F.local_response_norm(*args)


def test_backward_op_checks_grad():
    with pytest.raises(ValueError, match="grad_output has shape"):
        torch.ops.fastcnn.local_response_norm_backward(torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 4),
                                                       5, 1e-4, 0.75, 1.0)
