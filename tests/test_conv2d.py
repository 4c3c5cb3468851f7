"""fastcnn::conv2d against torch: act(conv2d(x, w) + bias + residual), forward and
every gradient, on every backend, for odd geometries and for every distinct
convolution of the classic networks; the channel-slice output; the backward ops
on their own; bad input."""

from dataclasses import dataclass, replace

import pytest
import torch

import fastcnn
from fastcnn import functional as F
from fastcnn.bench.layers import conv_layers
from fastcnn.ops.layout import memory_format_of
from conftest import (DTYPES, LAYOUTS, act_grad_from_output, assert_close, assert_close_normwise,
                      assert_same_output_on_1_and_2_threads, make_input, reduction_scale)

ACTS = [None, "relu", "tanh", "sigmoid"]
TORCH_ACTS = {None: lambda v: v, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


pytestmark = pytest.mark.usefixtures("exact_float32")


@dataclass(frozen=True)
class Conv:
    name: str
    n: int
    c: int
    h: int
    w: int
    k: int
    kernel: tuple
    stride: object = 1
    padding: object = 0
    dilation: object = 1
    groups: int = 1

    def __str__(self):
        return self.name


ODD = [
    Conv("c1", 2, 1, 7, 9, 4, (3, 3), padding=1),
    Conv("c3_5x5_s2", 2, 3, 11, 13, 5, (5, 5), stride=2, padding=2),
    Conv("prime", 1, 5, 13, 11, 7, (3, 3), padding=1),
    Conv("h_ne_w_rect_kernel", 2, 4, 6, 9, 3, (2, 3), stride=(2, 1), padding=(1, 0)),
    Conv("stride3", 2, 4, 10, 11, 6, (3, 3), stride=3, padding=1),
    Conv("dilation2", 2, 4, 9, 9, 5, (3, 3), padding=2, dilation=2),
    Conv("dilation_per_dim", 1, 3, 8, 10, 4, (3, 2), padding=(2, 1), dilation=(2, 3)),
    Conv("groups2", 2, 6, 8, 7, 4, (3, 3), padding=1, groups=2),
    Conv("depthwise", 2, 6, 7, 8, 6, (3, 3), padding=1, groups=6),
    Conv("image_1x1", 3, 8, 1, 1, 5, (1, 1)),
    Conv("image_1x1_padded", 2, 3, 1, 1, 4, (3, 3), padding=1),
    Conv("kernel_fills_padded_input", 2, 3, 5, 4, 4, (7, 6), padding=1),
    Conv("same_even_kernel", 2, 4, 7, 6, 3, (4, 2), padding="same"),
    Conv("pointwise", 2, 16, 5, 6, 12, (1, 1)),
    Conv("pointwise_stride2", 2, 8, 7, 7, 9, (1, 1), stride=2),
    Conv("k1", 2, 5, 6, 6, 1, (3, 3), padding=1),
]
CASES = {conv.name: conv for conv in ODD}


def make_weight(conv: Conv, dtype, device, layout="nchw", requires_grad=False):
    """Scaled as a layer's initialisation would be, so outputs are O(1) whatever the fan-in."""
    fan_in = conv.c // conv.groups * conv.kernel[0] * conv.kernel[1]
    w = torch.randn(conv.k, conv.c // conv.groups, *conv.kernel) / fan_in ** 0.5
    w = w.to(device=device, dtype=dtype)
    if layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    return w.requires_grad_(requires_grad)


def out_shape(conv: Conv):
    x = torch.empty(conv.n, conv.c, conv.h, conv.w, device="meta")
    w = torch.empty(conv.k, conv.c // conv.groups, *conv.kernel, device="meta")
    return tuple(torch.nn.functional.conv2d(x, w, None, conv.stride, conv.padding, conv.dilation, conv.groups).shape)


def reference_pre_activation(conv: Conv, x, w, bias, residual):
    """conv + bias + residual in float64, from the same (rounded) inputs."""
    y = torch.nn.functional.conv2d(x.double(), w.double(), None if bias is None else bias.double(), conv.stride,
                                   conv.padding, conv.dilation, conv.groups)
    return y if residual is None else y + residual.double()


def reference(conv: Conv, x, w, bias, residual, act):
    """The eager composition in float64."""
    return TORCH_ACTS[act](reference_pre_activation(conv, x, w, bias, residual))


def run_fastcnn(conv: Conv, x, w, bias, residual, act):
    return F.conv2d(x, w, bias, conv.stride, conv.padding, conv.dilation, conv.groups, residual=residual, act=act)


def inputs(conv: Conv, dtype, device, layout="channels_last", *, bias=True, residual=True, requires_grad=False,
           weight_layout="nchw"):
    x = make_input((conv.n, conv.c, conv.h, conv.w), dtype, device, layout, requires_grad)
    w = make_weight(conv, dtype, device, weight_layout, requires_grad)
    b = torch.randn(conv.k).to(device=device, dtype=dtype).requires_grad_(requires_grad) if bias else None
    r = make_input(out_shape(conv), dtype, device, layout, requires_grad) if residual else None
    return x, w, b, r


def check_forward_and_grads(conv: Conv, dtype, device, layout, act, *, bias=True, residual=True,
                            weight_layout="nchw", grads=True):
    x, w, b, r = inputs(conv, dtype, device, layout, bias=bias, residual=residual, requires_grad=grads,
                        weight_layout=weight_layout)
    out = run_fastcnn(conv, x, w, b, r, act)
    names = [n for n, t in zip("xwbr", (x, w, b, r)) if t is not None]
    leaves = [t for t in (x, w, b, r) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_(grads) for t in leaves]
    ref_args = iter(ref_leaves)
    pre = reference_pre_activation(conv, next(ref_args), next(ref_args), next(ref_args) if bias else None,
                                   next(ref_args) if residual else None)
    ref = TORCH_ACTS[act](pre)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=memory_format_of(x))
    cg, kg, taps = conv.c // conv.groups, conv.k // conv.groups, conv.kernel[0] * conv.kernel[1]
    assert_close(out, ref.to(dtype), scale=reduction_scale(cg * taps))
    if not grads:
        return
    grad = make_input(out.shape, dtype, device, "nchw")
    out.backward(grad)
    # The activation's gradient from fastcnn's output, as torch's autograd takes it from its own.
    pre.backward(act_grad_from_output(grad.double(), out.detach().double(), act))
    for name, got, expected in zip(names, leaves, ref_leaves):
        assert got.grad is not None, name
        assert got.grad.shape == got.shape, name
        # Terms per value: the batch and every output pixel for the weight and bias
        # gradients; output channels and taps for the input gradient.
        terms = {"x": kg * taps, "w": conv.n * out.shape[2] * out.shape[3], "r": 1}
        terms["b"] = terms["w"]
        assert_close(got.grad, expected.grad.to(dtype), scale=reduction_scale(terms[name]))


@pytest.mark.parametrize("conv", ODD, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_odd_geometries(backend_device, conv, layout):
    _, device = backend_device
    check_forward_and_grads(conv, torch.float32, device, layout, "relu", residual=conv.n == 2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("conv", [CASES["c3_5x5_s2"], CASES["groups2"], CASES["pointwise"]], ids=str)
def test_dtypes(backend_device, conv, dtype):
    _, device = backend_device
    check_forward_and_grads(conv, dtype, device, "channels_last", "relu")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias, residual", [(False, False), (True, False), (False, True), (True, True)])
def test_epilogues(backend_device, act, bias, residual):
    _, device = backend_device
    check_forward_and_grads(CASES["prime"], torch.float32, device, "channels_last", act, bias=bias, residual=residual)


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
@pytest.mark.parametrize("k", [1, 4, 5, 6, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_epilogue_at_every_tile_width(backend_device, act, k, dtype):
    """Output channel counts that fill a CPU micro-tile's columns (16 float, 8 double;
    the 16-bit types accumulate in float) partly, up to one vector (the half-width
    micro-kernel), exactly and past it; the tanh/sigmoid epilogue works on whole
    vectors of the tile."""
    backend, device = backend_device
    if dtype == torch.float64 and device == "cuda" and backend != "triton":
        pytest.skip("float64 runs on cpu, torch and triton")
    check_forward_and_grads(replace(CASES["prime"], name=f"k{k}", k=k), dtype, device, "channels_last", act,
                            residual=False, grads=False)


BY_CHANNEL = [Conv("lenet_conv1", 2, 1, 32, 32, 6, (5, 5)),
              Conv("row_runs_padded", 2, 1, 9, 30, 16, (3, 3), padding=1),
              Conv("stride2_dilated", 2, 1, 13, 17, 5, (3, 3), stride=2, padding=2, dilation=2),
              Conv("groups_of_8", 2, 2, 7, 11, 16, (3, 3), padding=1, groups=2)]


@pytest.mark.parametrize("conv", BY_CHANNEL, ids=str)
@pytest.mark.parametrize("act, residual", [("relu", True), ("tanh", True), ("tanh", False), ("sigmoid", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cpu_forward_by_channel(conv, act, residual, dtype):
    """NCHW output with one input and at most 16 output channels per group: the CPU
    forward's direct kernel (rows whose last block is shifted back, padding, stride 2
    with dilation, groups; tanh/sigmoid on whole vectors without a residual)."""
    if "cpu" not in fastcnn.available_backends("cpu"):
        pytest.skip("fastcnn._cpu is not built")
    from fastcnn import _native
    from fastcnn.ops.conv_geometry import conv_params, geometry
    x, w, _, _ = inputs(conv, dtype, "cpu", "nchw")
    out = torch.empty(out_shape(conv), dtype=dtype)
    params = conv_params(x, w, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert _native.load("_cpu").conv2d_forward_by_channel(geometry(params, x.shape, w.shape), list(x.stride()),
                                                          list(out.stride()))
    with fastcnn.use_backend("cpu"):
        check_forward_and_grads(conv, dtype, "cpu", "nchw", act, residual=residual, grads=False)


# Stride 1, one group, at least 16 input and fewer than 64 output channels, kernel > 1x1:
# the CPU input gradient runs as a forward conv of the output gradient with the weight
# transposed and flipped (padding dil * (kernel - 1) - pad).
INPUT_GRAD_AS_FORWARD = [
    Conv("ig_3x3", 2, 16, 9, 7, 24, (3, 3), padding=1),
    Conv("ig_valid_rect", 1, 20, 8, 11, 13, (2, 5)),
    Conv("ig_dilated", 2, 17, 10, 9, 33, (3, 2), padding=(2, 1), dilation=(2, 3)),
    Conv("ig_same_even", 1, 16, 7, 6, 8, (4, 2), padding="same"),
    Conv("ig_kernel_fills", 2, 16, 4, 5, 5, (5, 6), padding=1),
]


@pytest.mark.parametrize("conv", INPUT_GRAD_AS_FORWARD, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_cpu_input_grad_as_forward(conv, layout, dtype):
    if "cpu" not in fastcnn.available_backends("cpu"):
        pytest.skip("fastcnn._cpu is not built")
    with fastcnn.use_backend("cpu"):
        check_forward_and_grads(conv, dtype, "cpu", layout, "relu", residual=False)


# One group, at most 8 input channels, a multiple of 8 output channels, channels_last
# output gradient, float32: the CPU weight gradient broadcasts each pixel's taps from the
# input (its zero-padded copy where there is padding) against the output gradient read
# in place, 16 channels at a time (8 where the count is not a multiple of 16), over
# pixel splits fixed by the shape (several splits from 512 pixels on).
WEIGHT_GRAD_SMALL_TAPS = [
    Conv("wg_lenet", 2, 6, 14, 14, 16, (5, 5)),
    Conv("wg_padded_rect", 2, 3, 11, 10, 8, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
    Conv("wg_stem_7x7", 1, 3, 23, 21, 64, (7, 7), stride=2, padding=3),
    Conv("wg_one_channel", 1, 1, 9, 12, 24, (3, 3), padding=1),
    Conv("wg_many_splits", 3, 5, 19, 17, 16, (3, 4), padding=(2, 1), dilation=(1, 2)),
    Conv("wg_same_even", 2, 8, 6, 7, 40, (2, 4), padding="same"),
]


@pytest.mark.parametrize("conv", WEIGHT_GRAD_SMALL_TAPS, ids=str)
@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
def test_cpu_weight_grad_small_taps(conv, layout):
    if "cpu" not in fastcnn.available_backends("cpu"):
        pytest.skip("fastcnn._cpu is not built")
    with fastcnn.use_backend("cpu"):
        check_forward_and_grads(conv, torch.float32, "cpu", layout, "relu", residual=False)


def test_cpu_weight_grad_small_taps_same_bits_every_run():
    if "cpu" not in fastcnn.available_backends("cpu"):
        pytest.skip("fastcnn._cpu is not built")
    x = make_input((4, 3, 30, 28), torch.float32, "cpu", "channels_last")  # 3360 pixels: 6 splits
    grad = make_input((4, 16, 30, 28), torch.float32, "cpu", "channels_last")
    with fastcnn.use_backend("cpu"):
        runs = [torch.ops.fastcnn.conv2d_weight_grad(grad, x, [16, 3, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1)
                for _ in range(3)]
    reference = torch.ops.aten.convolution_backward(grad.double(), x.double(), torch.empty(16, 3, 3, 3).double(),
                                                    None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
                                                    [False, True, False])[1]
    assert_close(runs[0].double(), reference, dtype=torch.float32, scale=reduction_scale(3360))
    assert all(torch.equal(run, runs[0]) for run in runs[1:])


# Output layouts of the CPU weight-gradient kernel: rows already in its (r, s, c) column
# order (channels_last), the contiguous layout autograd hands out (rows reordered from a
# scratch, 8 taps x 8 channels at a time with remainders), and any other strides; with
# and without pixel splits (float32 from 2048 pixels where the output channels make one block).
WEIGHT_GRAD_OUT_LAYOUTS = {
    "contiguous": (0, 1, 2, 3),
    "channels_last": (0, 2, 3, 1),
    "k_r_c_s": (0, 2, 1, 3),
}


@pytest.mark.parametrize("out_layout", WEIGHT_GRAD_OUT_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("conv", [Conv("taps_9_channels_20", 2, 20, 7, 6, 24, (3, 3), padding=1),
                                  Conv("groups_2_rect", 1, 18, 9, 8, 10, (2, 5), padding=(0, 2), groups=2),
                                  # float32 pixel splits, fixed by the shape: 2 and 3 of them
                                  Conv("splits_2_taps_9", 2, 12, 48, 47, 20, (3, 3), padding=1),
                                  Conv("splits_3_1x1", 3, 16, 64, 64, 24, (1, 1)),
                                  # 1x1 with 16 or 32 output channels per group: the roles swapped
                                  Conv("by_input_k16", 2, 40, 16, 17, 16, (1, 1)),  # 3 K blocks
                                  Conv("by_input_k32_odd_channels", 2, 75, 5, 9, 32, (1, 1)),
                                  Conv("by_input_groups_2", 1, 64, 5, 5, 32, (1, 1), groups=2),
                                  # output channels in several row blocks, run by one task per
                                  # column block over one packing of the input (2 K blocks)
                                  Conv("row_blocks_3_k300", 2, 32, 12, 12, 300, (3, 3), padding=1),
                                  Conv("row_blocks_2_groups_2", 2, 40, 13, 12, 320, (3, 3), padding=1, groups=2)],
                         ids=str)
def test_cpu_weight_grad_output_strides(conv, dtype, out_layout):
    if "cpu" not in fastcnn.available_backends("cpu"):
        pytest.skip("fastcnn._cpu is not built")
    from fastcnn import _native
    from fastcnn.ops.conv_geometry import conv_params, geometry
    x = make_input((conv.n, conv.c, conv.h, conv.w), dtype, "cpu", "channels_last")
    grad = make_input(out_shape(conv), dtype, "cpu", "channels_last")
    size = [conv.k, conv.c // conv.groups, *conv.kernel]
    params = conv_params(x, torch.empty(size, dtype=dtype), conv.stride, conv.padding, conv.dilation, conv.groups)
    order = WEIGHT_GRAD_OUT_LAYOUTS[out_layout]
    grad_w = torch.full([size[i] for i in order], float("nan"), dtype=dtype).permute(
        *[order.index(i) for i in range(4)])
    _native.load("_cpu").conv2d_weight_grad(
        grad.data_ptr(), list(grad.stride()), x.data_ptr(), list(x.stride()), grad_w.data_ptr(),
        list(grad_w.stride()), geometry(params, x.shape, grad_w.shape), _native.dtype_code(grad_w))
    stride, padding, dilation, groups = params.as_lists()
    assert padding[:2] == padding[2:]  # symmetric cases: aten takes one pad per dimension
    reference = torch.ops.aten.convolution_backward(
        grad.double(), x.double(), torch.empty(size, dtype=torch.float64), None, stride, padding[:2], dilation,
        False, [0, 0], groups, [False, True, False])[1]
    # Normwise: over 12288 pixels some sums cancel to far below the rounding of their terms.
    assert_close_normwise(grad_w.double(), reference, dtype=dtype, scale=reduction_scale(conv.n * conv.h * conv.w))


@pytest.mark.parametrize("kernel, stride, padding, c, k", [
    ((1, 1), 1, (0, 0, 1, 1), 16, 16), ((1, 1), 2, (0, 0, 1, 2), 16, 16), ((3, 3), 1, (0, 1, 2, 0), 16, 16),
    ((2, 2), 1, (0, 0, 1, 1), 3, 32),  # "same" with an even kernel; the CPU's few-input-channel weight grad
    ((1, 1), 1, (0, 0, 1, 1), 64, 16),  # the CPU's 1x1 weight grad with input channels as rows
], ids=str)
def test_padding_at_bottom_and_right(backend_device, kernel, stride, padding, c, k):
    """The op schema's four-int padding (top, left, bottom, right), uneven: a kernel
    with no top or left padding still has taps outside the image in its last rows and
    columns, so it must not take a path that reads the input unmasked in place."""
    _, device = backend_device
    top, left, bottom, right = padding
    x = make_input((2, c, 5, 6), torch.float32, device, "channels_last", requires_grad=True)
    conv = Conv("uneven", 2, c, 5, 6, k, kernel)
    w = make_weight(conv, torch.float32, device, requires_grad=True)
    out = torch.ops.fastcnn.conv2d(x, w, None, None, [stride] * 2, list(padding), [1, 1], 1, None)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    ref = torch.nn.functional.conv2d(torch.nn.functional.pad(x64, (left, right, top, bottom)), w64, stride=stride)
    assert out.shape == ref.shape
    assert_close(out, ref.float(), scale=reduction_scale(c * kernel[0] * kernel[1]))
    grad = make_input(out.shape, torch.float32, device, "channels_last")
    out.backward(grad)
    ref.backward(grad.double())
    assert_close(x.grad, x64.grad.float(), scale=reduction_scale(k * kernel[0] * kernel[1]))
    assert_close(w.grad, w64.grad.float(), scale=reduction_scale(2 * out.shape[2] * out.shape[3]))


def test_float64(backend_device):
    backend, device = backend_device
    if device == "cuda" and backend != "triton":
        pytest.skip("float64 runs on cpu, torch and triton")
    for conv in (CASES["c3_5x5_s2"], CASES["depthwise"]):
        check_forward_and_grads(conv, torch.float64, device, "nchw", "tanh")


def test_channels_last_weight(backend_device):
    """model.to(memory_format=torch.channels_last) makes the weights channels_last too."""
    _, device = backend_device
    check_forward_and_grads(CASES["c3_5x5_s2"], torch.float32, device, "channels_last", "relu", weight_layout="channels_last")


def _layer_geometries():
    """Every distinct convolution of the classic networks (batch 1, spatial size cut
    down to what the kernel and stride need: the channels, kernel, stride and padding
    are the layer's own)."""
    out, seen = [], set()
    for layer in conv_layers():
        need = layer.kernel + 2 * layer.stride
        size = min(layer.size[0], max(need, 9))
        conv = Conv(f"{layer.net} {layer.name}", 1, layer.in_channels, size, size, layer.out_channels,
                    (layer.kernel, layer.kernel), layer.stride, layer.padding, 1, layer.groups)
        key = (conv.c, conv.h, conv.k, conv.kernel, conv.stride, conv.padding)
        if key not in seen:
            seen.add(key)
            out.append(conv)
    return out


LAYERS = _layer_geometries()


@pytest.mark.parametrize("conv", LAYERS, ids=str)
def test_network_layers(backend_device, conv):
    backend, device = backend_device
    if backend == "triton" and device == "cpu":
        # The interpreter runs the same geometry with the channels cut down (see test below).
        pytest.skip("too large for the Triton interpreter")
    check_forward_and_grads(conv, torch.float32, device, "channels_last", "relu", residual=conv.kernel == (1, 1))


@pytest.mark.parametrize("conv", sorted({replace(c, name=f"{c.kernel[0]}x{c.kernel[1]}/{c.stride} pad {c.padding}",
                                                 c=min(c.c, 5), k=min(c.k, 6), h=min(c.h, 12), w=min(c.w, 12))
                                         for c in LAYERS}, key=str), ids=str)
def test_network_layer_geometries_small(backend_device, conv):
    """Each kernel/stride/padding of the network layers with few channels: cheap enough
    for every backend, the Triton interpreter included."""
    _, device = backend_device
    check_forward_and_grads(conv, torch.float32, device, "channels_last", "relu")


def test_channel_slice_output(backend_device):
    """Two branches fill one pre-allocated output; the channels around them stay untouched."""
    _, device = backend_device
    a, b = CASES["pointwise"], replace(CASES["pointwise"], k=5, kernel=(3, 3), padding=1)
    x = make_input((a.n, a.c, a.h, a.w), torch.float32, device, "channels_last")
    wa, wb = make_weight(a, torch.float32, device), make_weight(b, torch.float32, device)
    bias = torch.randn(a.k, device=device)
    out = torch.full((a.n, 20, a.h, a.w), 7.0, device=device).contiguous(memory_format=torch.channels_last)
    ya = F.conv2d_relu(x, wa, bias, out=out, channel_offset=2)
    yb = F.conv2d(x, wb, None, 1, 1, out=out, channel_offset=2 + a.k, act="tanh")
    assert ya.data_ptr() == out[:, 2:].data_ptr() and yb.shape == (a.n, 5, a.h, a.w)
    assert_close(out[:, 2:2 + a.k], reference(a, x, wa, bias, None, "relu").float())
    assert_close(out[:, 2 + a.k:2 + a.k + 5], reference(b, x, wb, None, None, "tanh").float())
    assert torch.equal(out[:, :2], torch.full_like(out[:, :2], 7.0))
    assert torch.equal(out[:, 2 + a.k + 5:], torch.full_like(out[:, 2 + a.k + 5:], 7.0))


def test_channel_slice_output_with_grad(backend_device):
    """With a gradient to compute, the result is computed and copied into the slice,
    and the gradient flows back through it."""
    _, device = backend_device
    conv = CASES["pointwise"]
    x, w, b, _ = inputs(conv, torch.float32, device, requires_grad=True, residual=False)
    out = torch.zeros(conv.n, conv.k + 3, conv.h, conv.w, device=device)
    y = F.conv2d_relu(x, w, b, out=out, channel_offset=3)
    assert y.data_ptr() == out[:, 3:].data_ptr()
    scale = torch.randn(out.shape, device=device)
    (out * scale).sum().backward()
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    expected = reference(conv, xr, wr, br, None, "relu")
    (expected * scale[:, 3:].double()).sum().backward()
    assert_close(y, expected.float())
    assert_close(x.grad, xr.grad.float())
    assert_close(w.grad, wr.grad.float(), scale=4)
    assert_close(b.grad, br.grad.float(), scale=4)


def test_channel_slice_output_overlapping_its_operands(backend_device):
    """Operands inside out are read as they were before the call: here a 3x3
    convolution of out's first channels written back over them, plus themselves as
    the residual, so tiles overwrite pixels that their neighbours still read."""
    _, device = backend_device
    conv = Conv("in_place", 2, 6, 33, 40, 6, (3, 3), padding=1)
    out = make_input((conv.n, 8, conv.h, conv.w), torch.float32, device, "channels_last")
    w = make_weight(conv, torch.float32, device)
    for launch in range(2):  # the first call runs the op's body, the next a prepared launcher
        before = out.clone()
        expected = reference(conv, before[:, :6], w, None, before[:, :6], "relu").float()
        y = F.conv2d_relu(out[:, :6], w, None, 1, 1, residual=out[:, :6], out=out, channel_offset=0)
        assert y.data_ptr() == out.data_ptr()
        assert_close(out[:, :6], expected, scale=reduction_scale(6 * 9))
        assert torch.equal(out[:, 6:], before[:, 6:])


def test_channel_slice_output_with_an_expanded_operand_inside_it(backend_device):
    """A residual that is one element of out broadcast over the whole output (stride 0):
    copied as it was before the call, like any operand inside out."""
    _, device = backend_device
    x, w = torch.randn(2, 4, 5, 5, device=device), torch.randn(3, 4, 3, 3, device=device)
    out = torch.zeros(2, 3, 5, 5, device=device)
    out[:, :, 0, 0] = torch.randn(2, 3, device=device)
    residual = out[:, :, :1, :1].expand(2, 3, 5, 5)
    expected = torch.nn.functional.conv2d(x, w, padding=1) + residual.clone()
    F.conv2d(x, w, padding=1, residual=residual, out=out)
    assert_close(out, expected, scale=reduction_scale(36))


def test_into_op_checks_the_slice():
    x = torch.randn(1, 4, 5, 5)
    w = torch.randn(6, 4, 3, 3)
    out = torch.empty(1, 8, 5, 5)
    with pytest.raises(ValueError, match="channel_offset 3 \\+ 6 output channels does not fit"):
        F.conv2d(x, w, padding=1, out=out, channel_offset=3)
    with pytest.raises(ValueError, match="out must have batch and spatial size"):
        F.conv2d(x, w, padding=0, out=out)
    with pytest.raises(TypeError, match="channel_offset must be an int"):
        F.conv2d(x, w, padding=1, out=out, channel_offset=1.0)


def test_unbatched(backend_device):
    _, device = backend_device
    x = torch.randn(3, 6, 5, device=device)
    w = torch.randn(4, 3, 3, 3, device=device)
    got = F.conv2d(x, w, None, 1, 1, act="sigmoid")
    assert_close(got, torch.sigmoid(torch.nn.functional.conv2d(x, w, None, 1, 1)))


def test_nan_propagates(backend_device):
    _, device = backend_device
    x = torch.randn(1, 2, 6, 6, device=device)
    x[0, 1, 0, 0] = float("nan")
    w = torch.randn(3, 2, 3, 3, device=device)
    got = F.conv2d(x, w, None, 1, 1, act="relu")
    expected = torch.relu(torch.nn.functional.conv2d(x, w, None, 1, 1))
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().any()
    assert_close(got, expected, equal_nan=True)


def test_empty_batch(backend_device):
    _, device = backend_device
    conv = replace(CASES["prime"], n=0)
    x, w, b, r = inputs(conv, torch.float32, device, requires_grad=True)
    out = run_fastcnn(conv, x, w, b, r, "relu")
    assert out.shape == (0, conv.k, conv.h, conv.w)
    out.sum().backward()
    assert x.grad.shape == x.shape and r.grad.shape == r.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_expanded_gradient(backend_device):
    """`.sum().backward()` sends a gradient with zero strides; without bias or act it reaches the kernels as is."""
    _, device = backend_device
    conv = CASES["c3_5x5_s2"]
    x, w, _, _ = inputs(conv, torch.float32, device, requires_grad=True, bias=False, residual=False)
    run_fastcnn(conv, x, w, None, None, None).sum().backward()
    xr, wr = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    reference(conv, xr, wr, None, None, None).sum().backward()
    assert_close(x.grad, xr.grad.float())
    assert_close(w.grad, wr.grad.float(), scale=4)


def test_weight_grad_is_deterministic(backend_device):
    _, device = backend_device
    conv = replace(CASES["prime"], n=4, h=17, w=19)
    grad = torch.randn(out_shape(conv), device=device).contiguous(memory_format=torch.channels_last)
    x = make_input((conv.n, conv.c, conv.h, conv.w), torch.float32, device, "channels_last")
    args = ([conv.k, conv.c, *conv.kernel], [1, 1], [1, 1, 1, 1], [1, 1], 1)
    first = torch.ops.fastcnn.conv2d_weight_grad(grad, x, *args)
    for _ in range(3):
        assert torch.equal(torch.ops.fastcnn.conv2d_weight_grad(grad, x, *args), first)


WEIGHT_GRAD_SCRIPT = """
import hashlib
import torch, fastcnn
torch.manual_seed(0)
x = torch.randn(8, 16, 23, 29).contiguous(memory_format=torch.channels_last)
grad = torch.randn(8, 24, 23, 29).contiguous(memory_format=torch.channels_last)
with fastcnn.use_backend("cpu"):
    gw = torch.ops.fastcnn.conv2d_weight_grad(grad, x, [24, 16, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1)
    # Few input channels (the small-taps weight gradient, 8 pixel splits).
    small = torch.ops.fastcnn.conv2d_weight_grad(grad, x[:, :3], [24, 3, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1)
    # A linear weight gradient: a reduction over all 5336 pixels.
    g2, x2 = grad.permute(0, 2, 3, 1).reshape(-1, 24), x.permute(0, 2, 3, 1).reshape(-1, 16)
    lw = torch.ops.fastcnn.linear(g2.t(), x2.t(), None, None)
    # Batch-1 FC inference (the matrix-vector path): 4099 outputs over both threads.
    fc = torch.ops.fastcnn.linear(torch.randn(1, 1001), torch.randn(4099, 1001), torch.randn(4099), "relu")
    # 300 output channels: three row blocks run by one task per column block, 2 K blocks.
    g3 = torch.randn(2, 300, 12, 12).contiguous(memory_format=torch.channels_last)
    x3 = torch.randn(2, 20, 12, 12).contiguous(memory_format=torch.channels_last)
    blocks = torch.ops.fastcnn.conv2d_weight_grad(g3, x3, [300, 20, 3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 1)
    # A 3x3/2 input gradient: threads get ranges of tiles of equal work, not count.
    g4 = torch.randn(8, 24, 12, 15).contiguous(memory_format=torch.channels_last)
    w4 = torch.randn(24, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    gx = torch.ops.fastcnn.conv2d_input_grad(g4, w4, [8, 16, 23, 29], [2, 2], [1, 1, 1, 1], [1, 1], 1)
print(*(hashlib.sha256(t.numpy().tobytes()).hexdigest() for t in (gw, small, lw, fc, blocks, gx)))
"""


def test_cpu_reductions_independent_of_threads():
    """Weight gradients (and long linear reductions) come out bit-identical on 1 and 2 OpenMP threads."""
    if "cpu" not in fastcnn.available_backends("cpu"):
        pytest.skip("fastcnn._cpu is not built")
    assert_same_output_on_1_and_2_threads(WEIGHT_GRAD_SCRIPT)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck(backend):
    if backend not in fastcnn.available_backends("cpu"):
        pytest.skip(f"{backend} is not available")
    with fastcnn.use_backend(backend):
        for conv, act in ((CASES["c3_5x5_s2"], "tanh"), (CASES["groups2"], "sigmoid"), (CASES["same_even_kernel"], None)):
            x, w, b, r = inputs(conv, torch.float64, "cpu", "channels_last", requires_grad=True)
            assert torch.autograd.gradcheck(lambda *a: run_fastcnn(conv, *a, act), (x, w, b, r))
            if act == "sigmoid":  # the gradient ops' own gradients (double backward), on one case: it is slow
                assert torch.autograd.gradgradcheck(lambda *a: run_fastcnn(conv, *a, act), (x, w, b, r))


def test_opcheck():
    conv = CASES["groups2"]
    x, w, b, r = inputs(conv, torch.float32, "cpu", requires_grad=True)
    lists = ([1, 1], [1, 1, 1, 1], [1, 1], 2)
    torch.library.opcheck(torch.ops.fastcnn.conv2d, (x, w, b, r, *lists, "relu"))
    torch.library.opcheck(torch.ops.fastcnn.conv2d, (x.detach().contiguous(), w, None, None, *lists, None))
    grad = torch.randn(out_shape(conv)).contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastcnn.conv2d_input_grad, (grad, w.detach(), list(x.shape), *lists))
    torch.library.opcheck(torch.ops.fastcnn.conv2d_weight_grad, (grad, x.detach(), list(w.shape), *lists))
    torch.library.opcheck(torch.ops.fastcnn.conv2d_weight_grad, (grad, x.detach(), list(w.shape), *lists, True))
    out = torch.empty(conv.n, conv.k + 2, conv.h, conv.w)
    torch.library.opcheck(torch.ops.fastcnn.conv2d_into, (out, 1, x.detach(), w.detach(), None, None, *lists,
                                                          "tanh"))


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("weight_layout", ["nchw", "channels_last"])
def test_weight_grad_in_the_weights_layout(weight_layout, compiled):
    """A kxk weight's gradient comes back in the weight's own layout, as PyTorch's does
    (AccumulateGrad would otherwise copy it into a channels_last parameter every step),
    eagerly and under torch.compile. torch.autograd.grad: .grad would hide a wrong
    layout behind AccumulateGrad's copy."""
    conv = Conv("w_layout", 2, 5, 7, 6, 8, (3, 2), padding=1)
    x, w, _, _ = inputs(conv, torch.float32, "cpu", "channels_last", bias=False, residual=False,
                        requires_grad=True, weight_layout=weight_layout)

    def forward(x, w):
        return F.conv2d(x, w, padding=1, act="relu").sum()

    loss = (torch.compile(forward, fullgraph=True) if compiled else forward)(x, w)
    _, grad_w = torch.autograd.grad(loss, (x, w))
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    _, expected = torch.autograd.grad(torch.relu(torch.nn.functional.conv2d(xr, wr, padding=1)).sum(), (xr, wr))
    assert grad_w.stride() == w.stride()
    assert_close(grad_w, expected, scale=reduction_scale(conv.n * conv.h * conv.w))


def test_compile_fullgraph():
    """A small residual stack compiled whole, forward and backward."""
    conv_a = Conv("a", 2, 4, 8, 8, 6, (3, 3), padding=1)
    conv_b = Conv("b", 2, 6, 8, 8, 6, (1, 1))

    def block(x, wa, ba, wb, fc):
        y = F.conv2d_relu(x, wa, ba, padding=1)
        y = F.conv2d(y, wb, residual=y, act="relu")
        return F.linear(y.mean((2, 3)), fc, act="tanh")

    x = make_input((2, 4, 8, 8), torch.float32, "cpu", "channels_last", requires_grad=True)
    wa = make_weight(conv_a, torch.float32, "cpu", "channels_last", requires_grad=True)
    wb = make_weight(conv_b, torch.float32, "cpu", requires_grad=True)
    ba = torch.randn(6, requires_grad=True)
    fc = torch.randn(3, 6, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    got = compiled(x, wa, ba, wb, fc)
    got.sum().backward()
    grads = [t.grad.clone() for t in (x, wa, ba, wb, fc)]
    for t in (x, wa, ba, wb, fc):
        t.grad = None
    expected = block(x, wa, ba, wb, fc)
    expected.sum().backward()
    assert_close(got, expected)
    for g, t in zip(grads, (x, wa, ba, wb, fc)):
        assert_close(g, t.grad, scale=4)


BAD = [
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3, device="meta")), {}, ValueError,
     "weight is on meta but input is on cpu"),
    (lambda: (torch.randn(1, 3, 5, 5), [[1.0]]), {}, TypeError, "weight must be a torch.Tensor"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"bias": torch.randn(4, dtype=torch.float64)},
     TypeError, "bias has dtype"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"bias": torch.randn(1, 4)}, ValueError,
     "bias must have 1 dimensions"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"bias": 1.0}, TypeError,
     "bias must be a torch.Tensor"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"residual": torch.randn(1, 4, 3, 3, device="meta")},
     ValueError, "residual is on meta but input is on cpu"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"stride": 1.5}, TypeError,
     "stride must be an int or a pair of ints"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"groups": 1.0}, TypeError, "groups must be an int"),
    (lambda: (torch.randn(1, 0, 5, 5), torch.randn(4, 0, 3, 3)), {}, ValueError,
     "input must have at least one channel"),
    (lambda: (torch.randn(1, 3, 0, 5), torch.randn(4, 3, 1, 1)), {"padding": 1}, ValueError,
     "input must have a non-empty image"),
    (lambda: (torch.randn(3, 5), torch.randn(4, 3, 3, 3)), {}, ValueError, "input must have 3 \\(C, H, W\\) or 4"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3)), {}, ValueError, "weight must have 4 dimensions"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 2, 3, 3)), {}, ValueError, "input has 3 channels"),
    (lambda: (torch.randn(1, 4, 5, 5), torch.randn(3, 2, 3, 3)), {"groups": 2}, ValueError,
     "weight.shape\\[0\\] = 3 output channels must be divisible by groups"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3, dtype=torch.float64)), {}, TypeError,
     "weight has dtype"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"bias": torch.randn(5)}, ValueError,
     "bias must have weight.shape"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"residual": torch.randn(1, 4, 5, 5)}, ValueError,
     "residual must have the output's shape \\(1, 4, 3, 3\\)"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"act": "gelu"}, ValueError, "act must be"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"stride": 0}, ValueError, "stride must be positive"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"padding": -1}, ValueError,
     "padding must be non-negative"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"padding": "full"}, ValueError,
     "padding must be an int, a pair of ints, 'valid' or 'same'"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"padding": "same", "stride": 2}, ValueError,
     "padding='same' needs stride 1"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"dilation": 0}, ValueError,
     "dilation must be positive"),
    (lambda: (torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)), {"groups": 0}, ValueError, "groups must be positive"),
    (lambda: (torch.randn(1, 3, 2, 5), torch.randn(4, 3, 3, 3)), {}, ValueError,
     "input of spatial size 2x5 is too small for a 3x3 kernel"),
    (lambda: (torch.randn(1, 3, 5, 5, dtype=torch.float64).int(), torch.randn(4, 3, 3, 3)), {}, TypeError,
     "input must be float32"),
]


@pytest.mark.parametrize("make, kwargs, error, match", BAD)
def test_bad_input(make, kwargs, error, match):
    x, w = make()
    with pytest.raises(error, match=match):
        F.conv2d(x, w, **kwargs)
    schema_ok = (isinstance(w, torch.Tensor) and isinstance(kwargs.get("groups", 1), int)
                 and all(isinstance(kwargs.get(k), (torch.Tensor, type(None))) for k in ("bias", "residual"))
                 and not {"padding", "stride", "dilation"} & kwargs.keys())
    if schema_ok and x.dim() == 4 and w.dim() == 4:
        op_args = (x, w, kwargs.get("bias"), kwargs.get("residual"), [1, 1], [0, 0, 0, 0], [1, 1],
                   kwargs.get("groups", 1), kwargs.get("act"))
        with pytest.raises(error, match=match):  # the op checks too, not only the functional
            torch.ops.fastcnn.conv2d(*op_args)


def test_functional_argument_rules():
    x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3)
    with pytest.raises(TypeError, match="padding must be an int, a pair of ints"):
        F.conv2d(x, w, padding=(1, 1, 1, 1))  # four ints are the op schema's form, not PyTorch's
    with pytest.raises(ValueError, match="channel_offset needs out"):
        F.conv2d(x, w, channel_offset=2)
    with pytest.raises(ValueError, match="residual must have 3 dimensions \\(C, H, W\\) like the unbatched input"):
        F.conv2d(x[0], w, residual=torch.randn(1, 4, 3, 3))
    with pytest.raises(ValueError, match="out must not have overlapping elements"):
        F.conv2d(x, w, out=torch.zeros(1, 1, 3, 3).expand(1, 4, 3, 3))


def test_out_needing_grad_is_not_overwritten_in_place(backend_device):
    """An `out` that is part of the autograd graph gets the copy path, so the
    gradient of what was overwritten is zero, as in PyTorch."""
    _, device = backend_device
    base = torch.zeros(1, 6, 5, 5, device=device, requires_grad=True)
    out = base * 1
    x, w = torch.randn(1, 3, 5, 5, device=device), torch.randn(4, 3, 3, 3, device=device)
    F.conv2d(x, w, padding=1, out=out, channel_offset=1)
    out.sum().backward()
    assert torch.equal(base.grad[:, 1:5], torch.zeros_like(base.grad[:, 1:5]))
    assert torch.equal(base.grad[:, 0], torch.ones_like(base.grad[:, 0]))


def test_unbatched_gradients(backend_device):
    _, device = backend_device
    conv = replace(CASES["c3_5x5_s2"], n=1)
    x, w, b, r = inputs(conv, torch.float32, device, "nchw", requires_grad=True)
    x1, r1 = x.detach()[0].requires_grad_(), r.detach()[0].requires_grad_()
    out = F.conv2d(x1, w, b, conv.stride, conv.padding, residual=r1, act="tanh")
    assert out.shape == out_shape(conv)[1:]
    out.sum().backward()
    run_fastcnn(conv, x, w, b, r, "tanh").sum().backward()
    assert_close(x1.grad, x.grad[0])
    assert_close(r1.grad, r.grad[0])


def test_bad_backward_op_input():
    grad = torch.randn(1, 4, 3, 3)
    w = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="grad must have the output's shape \\(1, 4, 7, 7\\)"):
        torch.ops.fastcnn.conv2d_input_grad(grad, w, [1, 3, 7, 7], [1, 1], [1, 1, 1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="input_size must be 4 non-negative sizes"):
        torch.ops.fastcnn.conv2d_input_grad(grad, w, [1, 3, -5, 5], [1, 1], [1, 1, 1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="weight_size must be 4 non-negative sizes"):
        torch.ops.fastcnn.conv2d_weight_grad(grad, torch.randn(1, 3, 5, 5), [4, 3, 3], [1, 1], [0, 0, 0, 0], [1, 1],
                                             1)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_modules_drop_in(backend_device, padding_mode):
    """fastcnn.nn.Conv2d / Conv2dReLU: torch.nn.Conv2d's parameters, initialisation and
    state_dict keys; outputs and gradients as torch.nn.Conv2d followed by the activation."""
    _, device = backend_device
    torch.manual_seed(3)
    ref = torch.nn.Conv2d(4, 6, 3, stride=1, padding=1, groups=2, padding_mode=padding_mode, device=device)
    torch.manual_seed(3)
    fused = fastcnn.nn.Conv2dReLU(4, 6, 3, stride=1, padding=1, groups=2, padding_mode=padding_mode, device=device)
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fused.parameters(), ref.parameters()))
    x = make_input((2, 4, 7, 6), torch.float32, device, "channels_last", requires_grad=True)
    got = fused(x)
    expected = torch.relu(ref(x))
    assert_close(got, expected, scale=reduction_scale(18))
    got.square().sum().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in fused.parameters())]
    x.grad = None
    expected.square().sum().backward()
    for g, e in zip(grads, [x.grad, *(p.grad for p in ref.parameters())]):
        assert_close(g, e, scale=reduction_scale(84))

    with_residual = fastcnn.nn.Conv2d(4, 6, 3, padding="same", activation="tanh", device=device)
    with_residual.load_state_dict(torch.nn.Conv2d(4, 6, 3, device=device).state_dict(), strict=True)
    r = torch.randn(2, 6, 7, 6, device=device)
    plain = torch.nn.Conv2d(4, 6, 3, padding="same", device=device)
    plain.load_state_dict(with_residual.state_dict())
    assert_close(with_residual(x.detach(), r), torch.tanh(plain(x.detach()) + r), scale=reduction_scale(36))


def test_module_rejects_unknown_activation():
    with pytest.raises(ValueError, match="act must be"):
        fastcnn.nn.Conv2d(3, 4, 3, activation="gelu")
