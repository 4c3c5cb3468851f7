"""fastcnn::global_avg_pool2d against torch.nn.functional.adaptive_avg_pool2d(x, 1):
the mean over H and W, in the input's layout, with sums whose order is fixed by
the shape (the same bits every run, whatever the thread count)."""

import pytest
import torch
import torch.nn.functional as TF

import fastcnn
from fastcnn import functional as F
from fastcnn.ops.layout import memory_format_of
from conftest import DTYPES, LAYOUTS, assert_close, make_input

SHAPES = [(2, 3, 5, 7), (1, 1, 1, 1), (3, 16, 13, 11), (2, 5, 1, 9), (1, 3, 7, 7), (2, 67, 17, 19)]


def reference(x):
    """torch's mean in float32 (float64 for float64), rounded once to x's dtype."""
    wide = x.double() if x.dtype == torch.float64 else x.float()
    return TF.adaptive_avg_pool2d(wide, 1).to(x.dtype)


def expected_strides(x):
    return TF.adaptive_avg_pool2d(x.detach(), 1).stride()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_backward(backend_device, shape, layout, dtype):
    _, device = backend_device
    x = make_input(shape, dtype, device, layout, requires_grad=True, seed=0)
    out = F.global_avg_pool2d(x)
    assert out.shape == (*shape[:2], 1, 1)
    # Sums of up to 323 terms in another order than torch's.
    assert_close(out, reference(x.detach()), scale=4)
    assert out.is_contiguous(memory_format=memory_format_of(x))

    grad = make_input(tuple(out.shape), dtype, device, seed=1)
    out.backward(grad)
    expected = (grad / (shape[2] * shape[3])).expand(shape)
    assert_close(x.grad, expected)
    assert x.grad.is_contiguous(memory_format=memory_format_of(x))


def test_layout_matches_torch(backend_device):
    """channels_last in, channels_last out: the (N, C, 1, 1) strides are torch's."""
    _, device = backend_device
    for layout in ("nchw", "channels_last"):
        x = make_input((2, 6, 5, 4), torch.float32, device, layout)
        assert F.global_avg_pool2d(x).stride() == expected_strides(x)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float64(backend_device, layout):
    _, device = backend_device
    x = make_input((2, 5, 9, 8), torch.float64, device, layout, requires_grad=True, seed=2)
    out = F.global_avg_pool2d(x)
    assert_close(out, TF.adaptive_avg_pool2d(x.detach(), 1))
    out.sum().backward()
    assert_close(x.grad, torch.full_like(x, 1 / 72))


def test_long_rows(backend_device):
    """Many terms per sum (a 56x56 plane): the tolerance grows with the terms' count."""
    _, device = backend_device
    for layout in ("nchw", "channels_last"):
        x = make_input((2, 8, 56, 56), torch.float32, device, layout, seed=3)
        assert_close(F.global_avg_pool2d(x), reference(x), scale=8)


def test_unbatched(backend_device):
    _, device = backend_device
    x = torch.randn(3, 7, 6, device=device)
    out = F.global_avg_pool2d(x)
    assert out.shape == (3, 1, 1)
    assert_close(out, TF.adaptive_avg_pool2d(x, 1))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
def test_nan_propagates(backend_device):
    _, device = backend_device
    x = torch.randn(2, 3, 6, 5, device=device)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[1, 2, 5, 4] = float("-inf")
    x[1, 2, 0, 0] = float("inf")  # inf - inf = nan
    for layout in (torch.contiguous_format, torch.channels_last):
        y = x.contiguous(memory_format=layout)
        assert_close(F.global_avg_pool2d(y), TF.adaptive_avg_pool2d(y, 1), equal_nan=True)


def test_empty_batch(backend_device):
    _, device = backend_device
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    out = F.global_avg_pool2d(x)
    assert out.shape == (0, 3, 1, 1)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_expanded_gradient(backend_device):
    """`.sum().backward()` sends a gradient with zero strides."""
    _, device = backend_device
    for layout in ("nchw", "channels_last"):
        x = make_input((2, 4, 7, 6), torch.float32, device, layout, requires_grad=True, seed=4)
        F.global_avg_pool2d(x).sum().backward()
        assert_close(x.grad, torch.full_like(x, 1 / 42))


def test_same_bits_every_run(backend_device):
    _, device = backend_device
    for layout in ("nchw", "channels_last"):
        x = make_input((2, 32, 23, 29), torch.float32, device, layout, seed=5)
        assert torch.equal(F.global_avg_pool2d(x), F.global_avg_pool2d(x.clone()))


def test_same_bits_for_any_thread_count():
    threads = torch.get_num_threads()
    try:
        with fastcnn.use_backend("cpu"):
            for layout in ("nchw", "channels_last"):
                for shape in [(4, 64, 7, 7), (1, 300, 15, 15)]:
                    x = make_input(shape, torch.float32, "cpu", layout, seed=6)
                    torch.set_num_threads(1)
                    one = F.global_avg_pool2d(x)
                    torch.set_num_threads(max(2, threads))
                    assert torch.equal(one, F.global_avg_pool2d(x))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck(backend):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    with fastcnn.use_backend(backend):
        assert torch.autograd.gradcheck(F.global_avg_pool2d, (x,))
        assert torch.autograd.gradgradcheck(F.global_avg_pool2d, (x,))
        y = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(F.global_avg_pool2d, (y,))


def test_opcheck():
    x = torch.randn(2, 3, 5, 4, requires_grad=True)
    torch.library.opcheck(torch.ops.fastcnn.global_avg_pool2d, (x,))
    torch.library.opcheck(torch.ops.fastcnn.global_avg_pool2d, (x.contiguous(memory_format=torch.channels_last),))
    grad = torch.randn(2, 3, 1, 1)
    torch.library.opcheck(torch.ops.fastcnn.global_avg_pool2d_backward, (grad, x.detach()))
    torch.library.opcheck(torch.ops.fastcnn.global_avg_pool2d_backward,
                          (grad, x.detach().contiguous(memory_format=torch.channels_last)))


def test_compile_fullgraph(backend_device):
    _, device = backend_device

    def head(x):
        return F.global_avg_pool2d(torch.relu(x)).flatten(1) * 3

    x = torch.randn(2, 8, 7, 7, device=device, requires_grad=True)
    compiled = torch.compile(head, fullgraph=True)
    out = compiled(x)
    assert_close(out, head(x))
    out.sum().backward()
    assert_close(x.grad, (x > 0).float() * 3 / 49)


def test_module():
    x = torch.randn(2, 3, 9, 8)
    # global pooling, the input's own size (copied), and other sizes (PyTorch's kernel)
    for size in (1, (1, 1), [1, 1], (None, 1), (1, None), (9, 8), (None, 8), 2, (1, 2), (3, 5)):
        out = fastcnn.nn.AdaptiveAvgPool2d(size)(x)
        assert_close(out, torch.nn.AdaptiveAvgPool2d(size)(x))
        assert out.data_ptr() != x.data_ptr()  # a new tensor, as torch's: writing into it leaves x alone
    for size in (0, (1, 2, 3), True, 1.0, (1, -1)):
        with pytest.raises(ValueError, match="output_size"):
            fastcnn.nn.AdaptiveAvgPool2d(size)
    # the function takes what torch's does: a size 0 is an empty output, not "keep the input's"
    for size in (0, (1, 0), (0, None)):
        assert F.adaptive_avg_pool2d(x, size).shape == torch.nn.functional.adaptive_avg_pool2d(x, size).shape
    for size in ((1, 2, 3), -1, 1.5, [1, True]):
        with pytest.raises(ValueError, match="output_size"):
            F.adaptive_avg_pool2d(x, size)
    with pytest.raises(ValueError, match="input must have 3"):
        F.adaptive_avg_pool2d(torch.randn(3, 4), 1)


def test_no_channels():
    """C = 0: an empty output, as torch's."""
    x = torch.randn(2, 0, 7, 6, requires_grad=True)
    out = F.global_avg_pool2d(x)
    assert out.shape == (2, 0, 1, 1)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: torch.ones(1, 2, 3, 3, dtype=torch.int32), TypeError, "input must be"),
        (lambda: [1.0], TypeError, "input must be a torch.Tensor"),
        (lambda: torch.randn(3, 3), ValueError, "input must have 3"),
        (lambda: torch.randn(1, 2, 0, 3), ValueError, "input must have non-zero"),
    ],
)
def test_bad_input(make, error, match):
    with pytest.raises(error, match=match):
        F.global_avg_pool2d(make())


def test_bad_backward_input():
    x = torch.randn(1, 2, 6, 6)
    with pytest.raises(ValueError, match="grad_output has shape"):
        torch.ops.fastcnn.global_avg_pool2d_backward(torch.randn(1, 2, 2, 1), x)
    with pytest.raises(TypeError, match="grad_output has dtype"):
        torch.ops.fastcnn.global_avg_pool2d_backward(torch.randn(1, 2, 1, 1, dtype=torch.float64), x)
    with pytest.raises(ValueError, match="input must have 4"):
        torch.ops.fastcnn.global_avg_pool2d(torch.randn(2, 6, 6))
