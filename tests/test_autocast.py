"""fastcnn's ops under torch.autocast (fastcnn/ops/autocast.py): convolutions and FC
layers compute in the autocast dtype, residual adds and bias adds in the widest input
dtype, pooling in its input's dtype, LRN in float32 (as torch's); through
fastcnn.functional, through torch.ops.fastcnn, inside torch.nn models mixed with torch
layers, and compiled."""

import pytest
import torch

import fastcnn
import fastcnn.nn as fnn
from fastcnn import functional as F
from conftest import (BACKEND_DEVICES, BACKEND_IDS, TOLERANCES, assert_close_normwise, reduction_scale,
                      relative_error)


def autocast_dtypes(device):
    """The dtypes autocast runs in on `device`: bfloat16 (the CPU's default), and
    float16 (CUDA's default) where the device has it."""
    return [torch.bfloat16, torch.float16] if device == "cuda" else [torch.bfloat16]


BACKEND_AUTOCAST = [pytest.param(b, d, dt, id=f"{i}-{str(dt)[6:]}")
                    for (b, d), i in zip(BACKEND_DEVICES, BACKEND_IDS) for dt in autocast_dtypes(d)]


def randn(*shape, device, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float32).to(device=device, dtype=dtype)


def cases(device):
    """name -> (function, tensor arguments by name, other arguments, policy); the
    tensors mix float32 with bfloat16 where the op takes two, so each rule has
    something to do. Passed by keyword: the model test passes them by position."""
    x = randn(2, 6, 9, 9, device=device)
    return {
        "conv2d": (F.conv2d, {"input": x, "weight": randn(8, 6, 3, 3, device=device), "bias": randn(8, device=device),
                              "residual": randn(2, 8, 7, 7, device=device)}, {"act": "relu"}, "lower"),
        "linear": (F.linear, {"input": randn(5, 12, device=device), "weight": randn(7, 12, device=device),
                              "bias": randn(7, device=device)}, {"act": "relu"}, "lower"),
        "add_act": (F.add_act, {"a": randn(2, 6, 5, 5, device=device, dtype=torch.bfloat16),
                                "b": randn(2, 6, 5, 5, device=device)}, {}, "widest"),
        "bias_act": (F.bias_act, {"x": randn(2, 6, 5, 5, device=device, dtype=torch.bfloat16),
                                  "bias": randn(6, device=device)}, {"act": "tanh"}, "widest"),
        "max_pool2d": (F.max_pool2d, {"input": x}, {"kernel_size": 3, "stride": 2}, "keep"),
        "avg_pool2d": (F.avg_pool2d, {"input": x}, {"kernel_size": 2}, "keep"),
        "global_avg_pool2d": (F.global_avg_pool2d, {"input": x}, {}, "keep"),
        "local_response_norm": (F.local_response_norm,
                                {"input": randn(2, 6, 9, 9, device=device, dtype=torch.bfloat16)}, {"size": 3},
                                "float32"),
    }


CASE_NAMES = list(cases("cpu"))


def expected_dtype(policy, tensors, autocast_dtype):
    if policy == "lower":
        return autocast_dtype
    if policy in ("widest", "float32"):
        return torch.float32
    return tensors[0].dtype


@pytest.mark.parametrize("name", CASE_NAMES)
@pytest.mark.parametrize("backend, device, autocast_dtype", BACKEND_AUTOCAST)
def test_functional_follows_policy(backend, device, autocast_dtype, name):
    """The result under autocast has the policy's dtype and equals the same function
    called outside autocast on inputs cast by hand: the cast happens before the
    kernel, not after it."""
    fn, tensors, kwargs, policy = cases(device)[name]
    dtype = expected_dtype(policy, list(tensors.values()), autocast_dtype)
    with fastcnn.use_backend(backend):
        with torch.autocast(device, dtype=autocast_dtype):
            out = fn(**tensors, **kwargs)
        by_hand = fn(**{k: t.to(dtype) for k, t in tensors.items()}, **kwargs)
    assert out.dtype == dtype
    assert torch.equal(out, by_hand)


def test_dispatcher_follows_policy():
    """torch.ops.fastcnn.* (what torch.compile and users of the ops call) cast as
    fastcnn.functional does."""
    x, w = randn(2, 6, 9, 9, device="cpu"), randn(8, 6, 3, 3, device="cpu")
    a, b = randn(2, 6, 5, 5, device="cpu", dtype=torch.bfloat16), randn(2, 6, 5, 5, device="cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        conv = torch.ops.fastcnn.conv2d(x, w, None, None, [1, 1], [0, 0], [1, 1], 1, "relu")
        added = torch.ops.fastcnn.add_act(a, b, "relu")
        pooled = torch.ops.fastcnn.avg_pool2d(x, [2, 2], [2, 2], [0, 0], False, True)
    assert conv.dtype == torch.bfloat16
    assert torch.equal(conv, F.conv2d(x.bfloat16(), w.bfloat16(), act="relu"))
    assert added.dtype == torch.float32
    assert torch.equal(added, F.add_act(a.float(), b))
    assert pooled.dtype == torch.float32
    assert torch.equal(pooled, F.avg_pool2d(x, 2))


def test_float64_is_not_lowered():
    """As torch's autocast: float64 tensors keep their dtype."""
    x, w = torch.randn(1, 3, 6, 6, dtype=torch.float64), torch.randn(4, 3, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.conv2d(x, w).dtype == torch.float64
        assert torch.ops.fastcnn.conv2d(x, w, None, None, [1, 1], [0, 0], [1, 1], 1, None).dtype == torch.float64


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=str)
def test_channel_slice_output_is_written_not_cast(out_dtype):
    """conv2d_into writes into `out`: autocast must not hand the kernel a cast copy of
    it (the result would be lost). The operands are cast to out's dtype instead, the
    dtype its caller chose, through the op and through fastcnn.functional."""
    x, w = randn(2, 3, 6, 6, device="cpu"), randn(4, 3, 3, 3, device="cpu")
    out = randn(2, 10, 4, 4, device="cpu", dtype=out_dtype)
    args = (x, w, None, None, [1, 1], [0, 0], [1, 1], 1, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.ops.fastcnn.conv2d_into(out, 5, *args)
        returned = F.conv2d(x, w, out=out, channel_offset=1)
    expected = F.conv2d(x.to(out_dtype), w.to(out_dtype))
    assert torch.equal(out[:, 5:9], expected)
    assert torch.equal(out[:, 1:5], expected) and returned.data_ptr() == out[:, 1:5].data_ptr()


def test_fused_inception_under_autocast():
    """A fused Inception module allocates its output in the dtype its convolutions
    compute in, so it runs under autocast whatever its input's dtype."""
    from fastcnn.models.googlenet import Inception
    block = Inception(16, 8, 4, 8, 4, 8, 8).eval()
    expected_block = Inception(16, 8, 4, 8, 4, 8, 8).eval()
    expected_block.load_state_dict(block.state_dict())
    for module in block.modules():
        if hasattr(module, "fuse_"):
            module.fuse_()
    x = randn(1, 16, 7, 7, device="cpu")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = block(x), expected_block(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    assert_close_normwise(got, expected, scale=reduction_scale(16 * 9))


def mixed_model(conv2d_relu, linear):
    """A torch convolution, then fastcnn's (or torch's) layers: autocast hands the
    second layer a bfloat16 input with float32 weights. Average pooling: a max pool's
    gradient follows whichever near-tie its rounding picks, which says nothing of
    either model's accuracy."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), conv2d_relu(8, 16, 3, padding=1), torch.nn.AvgPool2d(2),
                               torch.nn.Flatten(), linear(16 * 5 * 5, 10))


def torch_conv2d_relu(*args, **kwargs):
    return torch.nn.Sequential(torch.nn.Conv2d(*args, **kwargs), torch.nn.ReLU())


@pytest.mark.parametrize("backend, device, autocast_dtype", BACKEND_AUTOCAST)
def test_mixed_model_trains_like_torch(backend, device, autocast_dtype):
    """A model of torch and fastcnn layers trained under autocast computes in the autocast
    dtype like the same model of torch layers and lands as close to the float64 answer:
    output and gradients within twice torch's own autocast error, or the dtype's
    rounding where that is larger (cuDNN's half-precision gradients on an H100 are
    several roundings off)."""
    torch.manual_seed(0)
    ours = mixed_model(fnn.Conv2dReLU, fnn.Linear).to(device)
    ref = mixed_model(torch_conv2d_relu, torch.nn.Linear).to(device)
    ref.load_state_dict({k.replace("1.weight", "1.0.weight").replace("1.bias", "1.0.bias"): v
                         for k, v in ours.state_dict().items()})
    exact = mixed_model(torch_conv2d_relu, torch.nn.Linear).to(device, torch.float64)
    exact.load_state_dict(ref.state_dict())
    x = randn(4, 3, 12, 12, device=device)
    with fastcnn.use_backend(backend):
        with torch.autocast(device, dtype=autocast_dtype):
            out, expected = ours(x), ref(x)
        exact_out = exact(x.double())
        assert out.dtype == expected.dtype == autocast_dtype
        floor = TOLERANCES[autocast_dtype][0]
        assert relative_error(out, exact_out) <= max(2 * relative_error(expected, exact_out),
                                                     floor * reduction_scale(8 * 9))
        grad = randn(*out.shape, device=device, dtype=autocast_dtype)
        out.backward(grad)
        expected.backward(grad)
        exact_out.backward(grad.double())
    for (name, p), q, e in zip(ours.named_parameters(), ref.parameters(), exact.parameters()):
        assert p.grad.dtype == torch.float32, name
        bound = max(2 * relative_error(q.grad, e.grad), floor * reduction_scale(4 * 12 * 12))
        assert relative_error(p.grad, e.grad) <= bound, name


def test_compile_fullgraph_under_autocast():
    """torch.compile(fullgraph=True) traces the casts: same dtypes and values as eager."""
    def block(x, w, b, fc_w):
        y = F.conv2d(x, w, b, padding=1, act="relu")
        y = F.add_act(y, x.float())
        return F.linear(F.global_avg_pool2d(y).flatten(1), fc_w)

    x, w, b, fc_w = (randn(2, 6, 5, 5, device="cpu"), randn(6, 6, 3, 3, device="cpu"), randn(6, device="cpu"),
                     randn(4, 6, device="cpu"))
    compiled = torch.compile(block, fullgraph=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = compiled(x, w, b, fc_w), block(x, w, b, fc_w)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert torch.equal(out, expected)


def test_packed_weights_keep_their_cast():
    """A fused model's convolutions (pack_weight) keep a weight's cast copy between
    calls, so its packed copy is not made again each call; an in-place change of the
    weight makes a new copy, and a call that records a gradient casts afresh."""
    from fastcnn.ops import autocast as fastcnn_autocast
    x, w, b = randn(1, 8, 9, 9, device="cpu"), randn(16, 8, 3, 3, device="cpu"), randn(16, device="cpu")
    original = w.clone()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        results = [F.conv2d(x, w, b, padding=1, act="relu", pack_weight=True) for _ in range(2)]
        kept = fastcnn_autocast._KEPT_CASTS[id(w)][2]
        results.append(F.conv2d(x, w, b, padding=1, act="relu", pack_weight=True))
        assert fastcnn_autocast._KEPT_CASTS[id(w)][2] is kept  # the same copy, so the same packed weight
        w.mul_(-1)  # a new version: a new copy
        changed = F.conv2d(x, w, b, padding=1, act="relu", pack_weight=True)

    def by_hand(weight):
        return F.conv2d(x.bfloat16(), weight.bfloat16(), b.bfloat16(), padding=1, act="relu")

    assert all(torch.equal(r, by_hand(original)) for r in results)
    assert torch.equal(changed, by_hand(w))
    weight = w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.conv2d(x, weight, b, padding=1, pack_weight=True).float().sum().backward()
    assert id(weight) not in fastcnn_autocast._KEPT_CASTS and weight.grad is not None
