"""fastcnn::avg_pool2d against torch.nn.functional.avg_pool2d: PyTorch's window and
divisor rules (padding, ceil_mode, count_include_pad), layouts, NaN, and the
deterministic gather backward."""

import math

import pytest
import torch
import torch.nn.functional as TF

import fastcnn
from fastcnn import functional as F
from fastcnn.ops.layout import memory_format_of
from conftest import DTYPES, LAYOUTS, assert_close, make_input

# (shape, kernel_size, stride, padding, ceil_mode, count_include_pad)
CONFIGS = [
    ((2, 3, 7, 9), 3, 2, 1, False, True),
    ((2, 3, 7, 9), 3, 2, 1, True, False),  # a last window that runs past the padding
    ((1, 1, 1, 1), 1, 1, 0, False, True),  # 1x1 image
    ((3, 16, 8, 8), 2, 2, 0, False, True),  # 2x2/2, no overlap
    ((2, 5, 9, 9), 3, 1, 1, False, False),  # Inception 3x3/1 pad 1, padding not counted
    ((2, 5, 13, 11), (3, 2), (2, 1), (1, 0), True, True),  # H != W, ceil_mode
    ((1, 3, 13, 17), 5, 3, 2, True, False),  # prime sizes, big padding
    ((1, 3, 17, 1), (2, 1), (2, 1), (1, 0), False, True),  # W = 1
    ((2, 1, 6, 7), 4, 4, 2, True, True),  # C = 1, windows mostly padding
]
CONFIG_IDS = [f"{'x'.join(map(str, c[0]))}-k{c[1]}-s{c[2]}-p{c[3]}-{'ceil' if c[4] else 'floor'}-"
              f"{'incl' if c[5] else 'excl'}" for c in CONFIGS]


def pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def reference(x, kernel, stride, padding, ceil_mode, count_include_pad):
    """torch's avg_pool2d in float32 (float64 for float64), rounded once to x's dtype."""
    wide = x.double() if x.dtype == torch.float64 else x.float()
    return TF.avg_pool2d(wide, kernel, stride, padding, ceil_mode, count_include_pad).to(x.dtype)


def reference_grad(x, grad, kernel, stride, padding, ceil_mode, count_include_pad):
    """torch's gradient, from NCHW copies: on CUDA, torch's kernel for channels_last
    gradients is wrong when padding > 0 (pytorch/pytorch#188344, torch 2.11)."""
    wide = (x.double() if x.dtype == torch.float64 else x.float()).contiguous().detach().requires_grad_()
    TF.avg_pool2d(wide, kernel, stride, padding, ceil_mode, count_include_pad).backward(
        grad.to(wide.dtype).contiguous())
    return wide.grad.to(x.dtype)


def windows_per_element(kernel, stride):
    """Most windows that hold one input element: the terms of its gradient."""
    (kh, kw), (sh, sw) = pair(kernel), pair(stride)
    return math.ceil(kh / sh) * math.ceil(kw / sw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_forward_backward(backend_device, config, layout, dtype):
    _, device = backend_device
    shape, kernel, stride, padding, ceil_mode, cip = config
    x = make_input(shape, dtype, device, layout, requires_grad=True, seed=0)
    out = F.avg_pool2d(x, kernel, stride, padding, ceil_mode, cip)
    assert_close(out, reference(x.detach(), kernel, stride, padding, ceil_mode, cip))
    assert out.is_contiguous(memory_format=memory_format_of(x))

    grad = make_input(tuple(out.shape), dtype, device, layout, seed=1)
    out.backward(grad)
    expected = reference_grad(x.detach(), grad, kernel, stride, padding, ceil_mode, cip)
    assert_close(x.grad, expected, scale=windows_per_element(kernel, stride))
    assert x.grad.is_contiguous(memory_format=memory_format_of(x))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_float64(backend_device, layout):
    _, device = backend_device
    x = make_input((2, 4, 9, 8), torch.float64, device, layout, requires_grad=True, seed=2)
    out = F.avg_pool2d(x, 3, 2, 1, True, False)
    assert_close(out, TF.avg_pool2d(x.detach(), 3, 2, 1, True, False))
    out.sum().backward()
    assert_close(x.grad, reference_grad(x.detach(), torch.ones_like(out), 3, 2, 1, True, False))


def test_exact_on_cpu():
    """The CPU kernel sums in PyTorch's order (ih, then iw) and divides as it does:
    float32 results are bit for bit PyTorch's, forward and backward."""
    with fastcnn.use_backend("cpu"):
        for layout in ("nchw", "channels_last"):
            # 2x2/2 and 2x2/2 pad 1 divide by powers of two (a product by the reciprocal), 3x3/3 by 9
            for kernel, stride, padding, ceil_mode, cip in [(3, 1, 1, False, False), (2, 2, 0, False, True),
                                                            (3, 2, 1, True, False), (2, 2, 1, False, False),
                                                            (3, 3, 0, True, True)]:
                x = make_input((2, 16, 11, 10), torch.float32, "cpu", layout, requires_grad=True, seed=3)
                out = F.avg_pool2d(x, kernel, stride, padding, ceil_mode, cip)
                ref_x = x.detach().clone().requires_grad_()
                ref = TF.avg_pool2d(ref_x, kernel, stride, padding, ceil_mode, cip)
                assert torch.equal(out, ref)
                # -0.0 in places: a sum that starts from 0 makes them +0.0, as PyTorch's does
                grad = torch.where(torch.rand_like(ref) < 0.15, torch.full_like(ref, -0.0), torch.randn_like(ref))
                out.backward(grad)
                ref.backward(grad)
                assert torch.equal(x.grad, ref_x.grad)
                assert torch.equal(x.grad.signbit(), ref_x.grad.signbit())


def test_unbatched(backend_device):
    _, device = backend_device
    x = torch.randn(3, 7, 6, device=device)
    out = F.avg_pool2d(x, 2, 1, 1, False, False)
    assert out.shape == (3, 8, 7)
    assert_close(out, TF.avg_pool2d(x, 2, 1, 1, False, False))


def test_nan_propagates(backend_device):
    _, device = backend_device
    x = torch.randn(2, 3, 6, 6, device=device)
    x[0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    x[1, 2, 5, 5] = float("-inf")
    for layout in (torch.contiguous_format, torch.channels_last):
        y = x.contiguous(memory_format=layout)
        assert_close(F.avg_pool2d(y, 3, 1, 1), TF.avg_pool2d(y, 3, 1, 1), equal_nan=True)
        assert_close(F.avg_pool2d(y, 2), TF.avg_pool2d(y, 2), equal_nan=True)


def test_nan_gradient_propagates(backend_device):
    _, device = backend_device
    x = torch.randn(1, 2, 5, 5, device=device, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_()
    grad = torch.randn(1, 2, 5, 5, device=device)
    grad[0, 1, 2, 2] = float("nan")
    F.avg_pool2d(x, 3, 1, 1).backward(grad)
    TF.avg_pool2d(ref_x, 3, 1, 1).backward(grad)
    assert_close(x.grad, ref_x.grad, equal_nan=True)


def test_empty_batch(backend_device):
    _, device = backend_device
    x = torch.randn(0, 3, 8, 8, device=device, requires_grad=True)
    out = F.avg_pool2d(x, 3, 2, 1)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_expanded_gradient(backend_device):
    """`.sum().backward()` sends a gradient with zero strides."""
    _, device = backend_device
    for layout in ("nchw", "channels_last"):
        x = make_input((2, 4, 7, 7), torch.float32, device, layout, requires_grad=True, seed=4)
        F.avg_pool2d(x, 3, 2, 1, True, False).sum().backward()
        assert_close(x.grad, reference_grad(x.detach(), torch.ones(2, 4, 4, 4, device=device), 3, 2, 1, True, False))


def test_backward_is_deterministic(backend_device):
    _, device = backend_device
    x = make_input((2, 8, 12, 12), torch.float32, device, "channels_last", requires_grad=True, seed=5)
    grad = make_input((2, 8, 12, 12), torch.float32, device, "channels_last", seed=6)
    grads = []
    for _ in range(2):
        x.grad = None
        F.avg_pool2d(x, 3, 1, 1).backward(grad)
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck(backend):
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64, requires_grad=True)
    with fastcnn.use_backend(backend):
        for args in [(3, 2, 1, True, False), (2, 1, 1, False, True)]:
            assert torch.autograd.gradcheck(lambda t: F.avg_pool2d(t, *args), (x,))
            assert torch.autograd.gradgradcheck(lambda t: F.avg_pool2d(t, *args), (x,))
        y = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: F.avg_pool2d(t, 3, 2, 1, True, False), (y,))


def test_opcheck():
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    args = ([3, 3], [2, 2], [1, 1], True, False)
    torch.library.opcheck(torch.ops.fastcnn.avg_pool2d, (x, *args))
    torch.library.opcheck(torch.ops.fastcnn.avg_pool2d, (x.contiguous(memory_format=torch.channels_last), *args))
    grad = torch.randn(2, 3, 4, 4)
    torch.library.opcheck(torch.ops.fastcnn.avg_pool2d_backward, (grad, x.detach(), *args))
    torch.library.opcheck(torch.ops.fastcnn.avg_pool2d_backward,
                          (grad, x.detach().contiguous(memory_format=torch.channels_last), *args))


def test_compile_fullgraph(backend_device):
    _, device = backend_device

    def block(x):
        return F.avg_pool2d(x * 2, 3, 2, 1, False, False) + 1

    x = torch.randn(2, 8, 9, 9, device=device, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    assert_close(out, block(x))
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    (TF.avg_pool2d(ref_x * 2, 3, 2, 1, False, False) + 1).sum().backward()
    assert_close(x.grad, ref_x.grad)


def test_module():
    x = torch.randn(2, 3, 9, 8)
    ours = fastcnn.nn.AvgPool2d(3, padding=1, ceil_mode=True, count_include_pad=False)
    theirs = torch.nn.AvgPool2d(3, padding=1, ceil_mode=True, count_include_pad=False)
    assert_close(ours(x), theirs(x))
    assert "kernel_size=3" in repr(ours)
    with pytest.raises(NotImplementedError, match="divisor_override"):
        fastcnn.nn.AvgPool2d(2, divisor_override=3)


def bad(**changes):
    args = dict(input=torch.randn(1, 2, 6, 6), kernel_size=3, stride=None, padding=0, ceil_mode=False,
                count_include_pad=True)
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "args, error, match",
    [
        (bad(kernel_size=0), ValueError, "kernel_size must be positive"),
        (bad(kernel_size=(2, 2, 2)), TypeError, "kernel_size must be"),
        (bad(stride=0), ValueError, "stride must be positive"),
        (bad(padding=2), ValueError, "padding .* at most half"),
        (bad(padding=-1), ValueError, "padding must be non-negative"),
        (bad(ceil_mode=1), TypeError, "ceil_mode must be a bool"),
        (bad(count_include_pad=None), TypeError, "count_include_pad must be a bool"),
        (bad(kernel_size=7), ValueError, "too small"),
        (bad(input=torch.ones(1, 2, 6, 6, dtype=torch.int32)), TypeError, "input must be"),
        (bad(input=[1.0]), TypeError, "input must be a torch.Tensor"),
        (bad(input=torch.randn(6, 6)), ValueError, "input must have 3"),
        (bad(input=torch.randn(1, 0, 6, 6)), ValueError, "input must have non-zero"),
    ],
)
def test_bad_input(args, error, match):
    with pytest.raises(error, match=match):
        F.avg_pool2d(**args)


def test_bad_backward_input():
    x = torch.randn(1, 2, 6, 6)
    args = ([3, 3], [2, 2], [1, 1], False, True)
    with pytest.raises(ValueError, match="grad_output has shape"):
        torch.ops.fastcnn.avg_pool2d_backward(torch.randn(1, 2, 4, 4), x, *args)
    with pytest.raises(TypeError, match="grad_output has dtype"):
        torch.ops.fastcnn.avg_pool2d_backward(torch.randn(1, 2, 3, 3, dtype=torch.float64), x, *args)
    with pytest.raises(ValueError, match="input must have 4"):
        torch.ops.fastcnn.avg_pool2d(torch.randn(2, 6, 6), *args)
