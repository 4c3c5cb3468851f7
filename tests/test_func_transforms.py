"""fastcnn under torch.func transforms and forward-mode AD.

torch.library custom ops support neither functorch's grad nor forward-mode AD (the
tangents were dropped without a word), so under them fastcnn.functional runs each
op's reference made of PyTorch ops (fastcnn/ops/direct.py). Each case is checked
against the same transform of torch.nn.functional's composition, and whole models'
per-sample gradients (vmap of grad) against one autograd backward per sample, which
runs fastcnn's own kernels. Everything in float64, with fresh random inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jvp, vjp, vmap

import fastcnn
import fastcnn.functional as fF
from fastcnn import nn as fnn
from conftest import assert_close, assert_close_normwise

DTYPE = torch.float64
# The references run PyTorch's kernels for the device (on CUDA, cuDNN's and the pools' own).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="needs a CUDA device"))]


def _rand(*shape, device="cpu"):
    return torch.randn(shape, dtype=DTYPE, device=device)


# name: (fastcnn function, torch composition, input shapes)
CASES = {
    "conv2d_bias_residual_tanh": (
        lambda x, w, b, r: fF.conv2d(x, w, b, padding=1, residual=r, act="tanh"),
        lambda x, w, b, r: torch.tanh(F.conv2d(x, w, b, padding=1) + r),
        [(2, 3, 7, 6), (4, 3, 3, 3), (4,), (2, 4, 7, 6)]),
    "conv2d_groups_same_sigmoid": (  # an even kernel: padding "same" is uneven
        lambda x, w: fF.conv2d(x, w, padding="same", groups=2, act="sigmoid"),
        lambda x, w: torch.sigmoid(F.conv2d(x, w, padding="same", groups=2)),
        [(2, 4, 6, 5), (6, 2, 2, 2)]),
    "conv2d_stride2_relu": (
        lambda x, w, b: fF.conv2d_relu(x, w, b, stride=2, padding=(1, 2)),
        lambda x, w, b: torch.relu(F.conv2d(x, w, b, stride=2, padding=(1, 2))),
        [(2, 3, 9, 8), (5, 3, 3, 3), (5,)]),
    "linear_relu": (
        lambda x, w, b: fF.linear(x, w, b, act="relu"),
        lambda x, w, b: torch.relu(F.linear(x, w, b)),
        [(3, 5), (4, 5), (4,)]),
    "add_act": (
        lambda a, b: fF.add_act(a, b),
        lambda a, b: torch.relu(a + b),
        [(2, 3, 4, 5), (2, 3, 4, 5)]),
    "bias_act_tanh": (
        lambda x, b: fF.bias_act(x, b, act="tanh"),
        lambda x, b: torch.tanh(x + b.view(1, -1, 1, 1)),
        [(2, 3, 4, 5), (3,)]),
    "max_pool2d": (
        lambda x: fF.max_pool2d(x, 3, 2, 1, ceil_mode=True),
        lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
        [(2, 3, 7, 7)]),
    "max_pool2d_empty_windows": (  # dilated windows wholly in the padding: -inf, no gradient
        lambda x: fF.max_pool2d(x, 2, 1, 1, 3),
        # (torch's own backward scatters such windows' gradients past the plane: pad explicitly)
        lambda x: F.max_pool2d(F.pad(x, (1, 1, 1, 1), value=-math.inf), 2, 1, 0, 3),
        [(2, 2, 2, 5)]),
    "max_pool2d_module_indices": (
        lambda x: fnn.MaxPool2d(2, return_indices=True)(x)[0],
        lambda x: F.max_pool2d(x, 2),
        [(2, 3, 6, 6)]),
    "avg_pool2d": (
        lambda x: fF.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
        lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
        [(2, 3, 7, 7)]),
    "global_avg_pool2d": (
        fF.global_avg_pool2d,
        lambda x: F.adaptive_avg_pool2d(x, 1),
        [(2, 3, 5, 4)]),
    "adaptive_avg_pool2d": (
        lambda x: fF.adaptive_avg_pool2d(x, (4, 4)),
        lambda x: F.adaptive_avg_pool2d(x, (4, 4)),
        [(2, 3, 8, 8)]),
    "local_response_norm": (
        lambda x: fF.local_response_norm(x, 3, 1e-2, 0.75, 2.0),
        lambda x: F.local_response_norm(x, 3, 1e-2, 0.75, 2.0),
        [(2, 6, 4, 4)]),
}


def _per_transform(transform: str, fn, inputs, tangents):
    """What `transform` of fn gives at inputs (tangents: the cotangent of the output
    for vjp, one per input for jvp and forward_ad), as a tuple of tensors."""
    if transform == "vjp":
        out, pull = vjp(fn, *inputs)
        return (out, *pull(tangents[0]))
    if transform == "jvp":
        return jvp(fn, tuple(inputs), tuple(tangents))
    if transform == "forward_ad":
        with forward_ad.dual_level():
            out = fn(*(forward_ad.make_dual(x, t) for x, t in zip(inputs, tangents)))
            primal, tangent = forward_ad.unpack_dual(out)
            assert tangent is not None, "the tangent was dropped"
            return primal, tangent
    raise ValueError(transform)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("transform", ["vjp", "jvp", "forward_ad"])
@pytest.mark.parametrize("case", list(CASES))
def test_derivatives_match_torch(case, transform, device):
    fastcnn_fn, torch_fn, shapes = CASES[case]
    inputs = [_rand(*s, device=device) for s in shapes]
    if device == "cuda" and len(shapes[0]) == 4:
        inputs[0] = inputs[0].contiguous(memory_format=torch.channels_last)
    if transform == "vjp":
        tangents = [torch.randn_like(torch_fn(*inputs))]
    else:
        tangents = [torch.randn_like(x) for x in inputs]
    actual = _per_transform(transform, fastcnn_fn, inputs, tangents)
    # Expected on the CPU: torch's CUDA avg_pool2d backward is wrong for channels_last with padding.
    expected = _per_transform(transform, torch_fn, [x.cpu() for x in inputs], [t.cpu() for t in tangents])
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert_close(a.cpu(), e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_vmap_matches_a_loop(case, device):
    """Every input batched along a new leading dim (batched weights too)."""
    fastcnn_fn, torch_fn, shapes = CASES[case]
    batched = [_rand(3, *s, device=device) for s in shapes]
    actual = vmap(fastcnn_fn)(*batched)
    expected = torch.stack([torch_fn(*(x[i].cpu() for x in batched)) for i in range(3)])
    assert_close(actual.cpu(), expected)


def test_vmap_of_max_pool2d_indices():
    x = _rand(3, 2, 3, 6, 6)
    values, indices = vmap(fnn.MaxPool2d(2, return_indices=True))(x)
    expected = [F.max_pool2d(x[i], 2, return_indices=True) for i in range(3)]
    assert_close(values, torch.stack([v for v, _ in expected]))
    assert torch.equal(indices, torch.stack([i for _, i in expected]))


def test_vmap_of_conv2d_into_a_batched_out():
    """out= and channel_offset with out batched too: each sample's slice is written."""
    x, w, out = _rand(3, 2, 3, 6, 6), _rand(4, 3, 3, 3), _rand(3, 2, 8, 6, 6)
    expected = out.clone()
    slices = vmap(lambda xi, oi: fF.conv2d(xi, w, padding=1, out=oi, channel_offset=2))(x, out)
    for i in range(3):
        expected[i].narrow(1, 2, 4).copy_(F.conv2d(x[i], w, padding=1))
    assert_close(out, expected)
    assert_close(slices, expected.narrow(2, 2, 4))


@pytest.mark.parametrize("case", ["conv2d_bias_residual_tanh", "linear_relu", "max_pool2d", "local_response_norm"])
def test_batched_backward_matches_a_loop(case):
    """torch.autograd.grad(..., is_grads_batched=True) runs the backward under torch's
    older vmap, whose batched tensors have no storage: the backward ops must take the
    dispatcher, not read them as plain tensors."""
    fastcnn_fn, _, shapes = CASES[case]
    inputs = [_rand(*s).requires_grad_() for s in shapes]
    out = fastcnn_fn(*inputs)
    cotangents = _rand(3, *out.shape)
    batched = torch.autograd.grad(out, inputs, cotangents, is_grads_batched=True, retain_graph=True)
    for i in range(3):
        for b, g in zip(batched, torch.autograd.grad(out, inputs, cotangents[i], retain_graph=True)):
            assert_close(b[i], g)


def test_vectorized_jacobian_of_lenet5():
    model = fastcnn.models.lenet5(num_classes=10).to(DTYPE).eval()
    x = _rand(1, 1, 32, 32)
    assert_close(torch.autograd.functional.jacobian(model, x, vectorize=True),
                 torch.autograd.functional.jacobian(model, x))


def test_hessian_of_a_conv_matches_torch():
    x, w, b = _rand(1, 2, 5, 5), _rand(3, 2, 3, 3), _rand(3)

    def loss(fn):
        return lambda weight: fn(x, weight, b).square().sum()

    assert_close(hessian(loss(lambda x, w, b: fF.conv2d(x, w, b, padding=1, act="tanh")))(w),
                 hessian(loss(lambda x, w, b: torch.tanh(F.conv2d(x, w, b, padding=1))))(w))


def test_bad_input_under_vmap_names_the_argument():
    x, w, wrong_bias = _rand(3, 2, 3, 6, 6), _rand(4, 3, 3, 3), _rand(5)
    with pytest.raises(ValueError, match="bias"):
        vmap(lambda xi: fF.conv2d(xi, w, wrong_bias))(x)


# model name, input shape (C, H, W), fused
# (LRN and grouped convolutions, AlexNet's, are among the op cases above.)
MODELS = [("lenet5", (1, 32, 32), False), ("resnet18", (3, 32, 32), False), ("resnet18", (3, 32, 32), True),
          ("googlenet", (3, 64, 64), True)]


@pytest.mark.parametrize("name,shape,fused", MODELS, ids=[f"{n}{'-fused' if f else ''}" for n, _, f in MODELS])
def test_per_sample_gradients_match_backward_per_sample(name, shape, fused):
    """vmap(grad(...)) over a batch (the references), against one backward per sample
    through fastcnn's kernels. Eval mode: BatchNorm's running statistics are updated
    in place in training, which no grad transform allows (torch.nn's own BatchNorm
    alike)."""
    torch.manual_seed(0)
    model = fastcnn.models.get_model(name, num_classes=10).to(DTYPE).eval()
    if fused:
        model = model.fuse()
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())
    x, y = _rand(2, *shape), torch.randint(0, 10, (2,))

    def loss(p, xi, yi):
        return F.cross_entropy(functional_call(model, (p, buffers), (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(2):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for key, p in model.named_parameters():
            if p.grad is not None:  # GoogLeNet's side classifiers sit out of eval mode
                assert_close_normwise(per_sample[key][i], p.grad, scale=100)


def test_forward_ad_through_lenet5_matches_finite_differences():
    torch.manual_seed(0)
    model = fastcnn.models.lenet5(num_classes=10).to(DTYPE).eval()
    x, t = _rand(2, 1, 32, 32), _rand(2, 1, 32, 32)
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(model(forward_ad.make_dual(x, t))).tangent
    eps = 1e-6
    with torch.no_grad():
        central = (model(x + eps * t) - model(x - eps * t)) / (2 * eps)
    # A central difference is good to ~eps^2 relative, and to the rounding of the outputs over eps.
    assert (tangent - central).abs().max() <= 1e-7 * central.abs().max()
