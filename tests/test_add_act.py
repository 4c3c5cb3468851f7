"""fastcnn::add_act against torch: act(a + b), forward and backward."""

import pytest
import torch

import fastcnn
from fastcnn import functional as F
from conftest import DTYPES, LAYOUTS, assert_close, make_input

SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 16, 13, 11), (4, 37)]


def reference(a, b, act):
    y = a.float() + b.float()
    return (torch.relu(y) if act == "relu" else y).to(a.dtype)


@pytest.mark.parametrize("act", ["relu", None])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward(backend_device, layout, shape, dtype, act):
    _, device = backend_device
    if layout == "channels_last" and len(shape) != 4:
        pytest.skip("channels_last needs 4 dimensions")
    a = make_input(shape, dtype, device, layout, requires_grad=True)
    b = make_input(shape, dtype, device, layout, requires_grad=True)
    out = F.add_act(a, b, act)
    expected = reference(a.detach(), b.detach(), act)
    assert_close(out, expected)
    if len(shape) == 4:
        assert out.is_contiguous(memory_format=fastcnn.ops.layout.memory_format_of(a))

    grad = make_input(shape, dtype, device)
    out.backward(grad)
    expected_grad = torch.where(expected <= 0, 0, grad) if act == "relu" else grad
    assert_close(a.grad, expected_grad)
    assert_close(b.grad, expected_grad)


def test_nan_propagates(backend_device):
    _, device = backend_device
    a = torch.randn(2, 3, 4, 4, device=device)
    b = torch.randn(2, 3, 4, 4, device=device)
    a[0, 1, 2, 3] = float("nan")
    b[1, 0, 0, 0] = float("-inf")
    a.requires_grad_(True)
    ref_a = a.detach().clone().requires_grad_(True)
    out = F.add_act(a, b)
    expected = torch.relu(ref_a + b)
    assert_close(out, expected, equal_nan=True)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    assert_close(a.grad, ref_a.grad, equal_nan=True)


def test_empty_batch(backend_device):
    _, device = backend_device
    a = torch.randn(0, 3, 4, 4, device=device, requires_grad=True)
    out = F.add_act(a, torch.randn(0, 3, 4, 4, device=device))
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert a.grad.shape == a.shape


def test_expanded_gradient(backend_device):
    """`.sum().backward()` sends a gradient with zero strides."""
    _, device = backend_device
    a = make_input((2, 4, 3, 3), torch.float32, device, requires_grad=True)
    b = make_input((2, 4, 3, 3), torch.float32, device)
    F.add_act(a, b).sum().backward()
    assert_close(a.grad, (a + b > 0).float())


def test_gradcheck():
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    for backend in fastcnn.available_backends("cpu"):
        with fastcnn.use_backend(backend):
            assert torch.autograd.gradcheck(lambda x, y: F.add_act(x, y, "relu"), (a, b))
            assert torch.autograd.gradcheck(lambda x, y: F.add_act(x, y, None), (a, b))
            if backend != "triton":  # the interpreter is too slow for gradgradcheck's many calls
                assert torch.autograd.gradgradcheck(lambda x, y: F.add_act(x, y, "relu"), (a, b))


def test_opcheck():
    a = torch.randn(2, 3, 4, 5, requires_grad=True)
    b = torch.randn(2, 3, 4, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcnn.add_act, (a, b, "relu"))
    torch.library.opcheck(torch.ops.fastcnn.add_act, (a.contiguous(memory_format=torch.channels_last), b, None))
    grad, out = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    torch.library.opcheck(torch.ops.fastcnn.add_act_backward, (grad, out, "relu"))


def test_compile_fullgraph(backend_device):
    _, device = backend_device

    def block(x, y):
        return F.add_act(x * 2, y, "relu") - 1

    a = torch.randn(2, 8, 6, 6, device=device, requires_grad=True)
    b = torch.randn(2, 8, 6, 6, device=device)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(a, b)
    assert_close(out, block(a, b))
    out.sum().backward()
    assert_close(a.grad, 2 * ((2 * a + b) > 0).float())


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(2, 3), torch.randn(2, 4), "relu"), ValueError, "b has shape"),
        (lambda: (torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64), "relu"), TypeError, "b has dtype"),
        (lambda: (torch.randn(2, 3), torch.randn(2, 3), "gelu"), ValueError, "act must be"),
        (lambda: (torch.randn(2, 3), torch.randn(2, 3), "tanh"), ValueError, "act must be"),
        (lambda: (torch.ones(2, 3, dtype=torch.int32), torch.randn(2, 3), "relu"), TypeError, "a must be"),
        (lambda: ([1.0], torch.randn(1), "relu"), TypeError, "a must be a torch.Tensor"),
    ],
)
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        F.add_act(*make())
