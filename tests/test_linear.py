"""fastcnn::linear against torch: act(input @ weight.T + bias) as one GEMM, forward and
gradients (which are the same op on transposed views), every backend and dtype."""

import pytest
import torch

import fastcnn
from fastcnn import functional as F
from fastcnn.bench.layers import linear_layers
from conftest import DTYPES, act_grad_from_output, assert_close, reduction_scale

ACTS = [None, "relu", "tanh", "sigmoid"]
TORCH_ACTS = {None: lambda v: v, "relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
# (input shape, out_features): odd sizes, 1 x 1, a 3-D and a 1-D input, K longer than any tile.
SHAPES = [((5, 7), 3), ((1, 1), 1), ((8, 33), 17), ((2, 3, 9), 4), ((6,), 5), ((3, 300), 10)]


pytestmark = pytest.mark.usefixtures("exact_float32")


def make(shape, out_features, dtype, device, *, bias=True, requires_grad=True):
    x = torch.randn(shape).to(device=device, dtype=dtype).requires_grad_(requires_grad)
    w = (torch.randn(out_features, shape[-1]) / shape[-1] ** 0.5).to(device=device, dtype=dtype)
    b = torch.randn(out_features).to(device=device, dtype=dtype) if bias else None
    return x, w.requires_grad_(requires_grad), None if b is None else b.requires_grad_(requires_grad)


def check(x, w, b, act):
    out = F.linear(x, w, b, act=act)
    leaves = [t for t in (x, w, b) if t is not None]
    refs = [t.detach().double().requires_grad_() for t in leaves]
    pre = torch.nn.functional.linear(refs[0], refs[1], refs[2] if b is not None else None)
    ref = TORCH_ACTS[act](pre)
    assert out.shape == ref.shape and out.dtype == x.dtype
    assert_close(out, ref.to(x.dtype), scale=reduction_scale(x.shape[-1]))
    grad = torch.randn(out.shape).to(device=out.device, dtype=out.dtype)
    out.backward(grad)
    # The activation's gradient from fastcnn's output (a value within rounding of 0 cannot flip ReLU).
    pre.backward(act_grad_from_output(grad.double(), out.detach().double(), act))
    batch = x.numel() // x.shape[-1]
    for name, got, expected in zip("xwb", leaves, refs):
        terms = {"x": w.shape[0], "w": batch, "b": batch}[name]
        assert_close(got.grad, expected.grad.to(x.dtype), scale=reduction_scale(terms))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape, out_features", SHAPES, ids=str)
def test_forward_backward(backend_device, shape, out_features, act):
    _, device = backend_device
    check(*make(shape, out_features, torch.float32, device), act)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("in_features, out_features", [(1, 1), (7, 3), (8, 4), (9, 5), (33, 17), (300, 10)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_small_batch_inference(backend_device, rows, in_features, out_features, dtype):
    """Batches of up to four rows take the CPU's matrix-vector path (one more row
    does not): every tail of k (vectors of 8 or 4) and of n (blocks of 4 rows)."""
    _, device = backend_device
    for act, bias in ((None, False), ("relu", True), ("tanh", True)):
        x, w, b = make((rows, in_features), out_features, dtype, device, bias=bias, requires_grad=False)
        expected = TORCH_ACTS[act](torch.nn.functional.linear(x.double(), w.double(),
                                                              None if b is None else b.double()))
        assert_close(F.linear(x, w, b, act=act), expected.to(dtype), scale=reduction_scale(in_features))


@pytest.mark.parametrize("rows, in_features", [(1, 300), (3, 33), (8, 40), (9, 8), (20, 1), (9, 9)])
@pytest.mark.parametrize("out_features", [1, 9, 17, 2100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_transposed_weight(backend_device, rows, in_features, out_features, dtype):
    """A weight that is a transposed view (contiguous along out_features, as the
    backward passes it) with up to eight rows or a sum of up to eight terms takes
    the CPU's row-update path (9 x 9 does not); columns past its 16 KB chunks,
    partial row blocks."""
    _, device = backend_device
    for act, bias in ((None, False), ("relu", True), ("sigmoid", True)):
        x, w, b = make((rows, in_features), out_features, dtype, device, bias=bias, requires_grad=False)
        w_t = w.t().contiguous().t()
        expected = TORCH_ACTS[act](torch.nn.functional.linear(x.double(), w.double(),
                                                              None if b is None else b.double()))
        assert_close(F.linear(x, w_t, b, act=act), expected.to(dtype), scale=reduction_scale(in_features))


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
@pytest.mark.parametrize("out_features", [1, 6, 8, 9, 16, 17, 33])
@pytest.mark.parametrize("bias", [True, False])
def test_epilogue_at_every_tile_width(backend_device, act, out_features, bias):
    """Widths that fill a CPU micro-tile's 16 columns partly, exactly and past it
    (batch 7: the blocked GEMM, not the matrix-vector path)."""
    _, device = backend_device
    check(*make((7, 20), out_features, torch.float32, device, bias=bias), act)


@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_epilogue_activation_over_the_float_range(backend_device, act):
    """tanh and sigmoid in the epilogue (the CPU evaluates them 8 lanes at a time
    with its own exp) across [-100, 100] and at the edges: the polynomial's switch
    at 0.625, the exp clamps near 88, zeros, infinities and NaN."""
    _, device = backend_device
    edges = [0.0, -0.0, 1e-30, -1e-30, 1e-8, 0.624999, 0.625, 0.625001, 44.0, 87.5, 88.0, 89.0, 1e4, -1e4,
             float("inf"), float("-inf"), float("nan")]
    v = torch.cat([torch.linspace(-100, 100, 20001), torch.tensor(edges)]).to(device)
    got = F.linear(v.view(-1, 1), torch.ones(1, 1, device=device), None, act=act).view(-1)
    expected = TORCH_ACTS[act](v.double()).float()
    assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_dtypes(backend_device, dtype, bias):
    _, device = backend_device
    check(*make((9, 40), 24, dtype, device, bias=bias), "relu")


def test_float64(backend_device):
    backend, device = backend_device
    if device == "cuda" and backend != "triton":
        pytest.skip("float64 runs on cpu, torch and triton")
    check(*make((4, 19), 6, torch.float64, device), "sigmoid")


@pytest.mark.parametrize("layer", linear_layers(), ids=lambda l: l.label)
def test_network_layers(backend_device, layer):
    """Every distinct FC layer of the classic networks at its batch size, features capped at 1024."""
    backend, device = backend_device
    if backend == "triton" and device == "cpu":
        pytest.skip("too large for the Triton interpreter (the shapes above cover its code paths)")
    check(*make((layer.batch, min(layer.in_features, 1024)), min(layer.out_features, 1024), torch.float32, device),
          "relu")


def test_strided_operands(backend_device):
    """A transposed weight and a non-contiguous input run without copies and match."""
    _, device = backend_device
    x = torch.randn(12, 20, device=device)[::2, ::2].requires_grad_()
    w = torch.randn(10, 7, device=device).t().requires_grad_()  # (7, 10): a transposed view
    b = torch.randn(7, device=device, requires_grad=True)
    check(x, w, b, "tanh")


def test_expanded_gradient(backend_device):
    """`.sum().backward()` with no bias or act hands the zero-stride gradient to both GEMMs as is."""
    _, device = backend_device
    x, w, _ = make((2, 3, 9), 4, torch.float32, device, bias=False)
    F.linear(x, w).sum().backward()
    assert_close(x.grad, w.detach().sum(0).expand(2, 3, 9))
    assert_close(w.grad, x.detach().reshape(-1, 9).sum(0).expand(4, 9))


def test_empty_batch(backend_device):
    _, device = backend_device
    x, w, b = make((0, 5), 3, torch.float32, device)
    out = F.linear(x, w, b, act="relu")
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


def test_no_input_features(backend_device):
    _, device = backend_device
    x, w, b = make((4, 0), 3, torch.float32, device)
    assert_close(F.linear(x, w, b, act="sigmoid"), torch.sigmoid(b.detach()).expand(4, 3))


def test_nan_propagates(backend_device):
    _, device = backend_device
    x = torch.randn(3, 8, device=device)
    x[1, 2] = float("nan")
    w = torch.randn(5, 8, device=device)
    got = F.linear(x, w, act="relu")
    expected = torch.relu(torch.nn.functional.linear(x, w))
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().any()
    assert_close(got, expected, equal_nan=True)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_gradcheck(backend):
    if backend not in fastcnn.available_backends("cpu"):
        pytest.skip(f"{backend} is not available")
    with fastcnn.use_backend(backend):
        for act in ACTS:
            x, w, b = make((3, 2, 7), 4, torch.float64, "cpu")
            assert torch.autograd.gradcheck(lambda *a: F.linear(*a, act=act), (x, w, b))
            assert torch.autograd.gradgradcheck(lambda *a: F.linear(*a, act=act), (x, w, b))


def test_opcheck():
    x, w, b = make((5, 7), 3, torch.float32, "cpu")
    torch.library.opcheck(torch.ops.fastcnn.linear, (x, w, b, "relu"))
    torch.library.opcheck(torch.ops.fastcnn.linear, (x.detach().t().contiguous().t(), w, None, None))


def test_compile_fullgraph():
    def mlp(x, w1, b1, w2):
        return F.linear(F.linear(x, w1, b1, act="relu"), w2, act="sigmoid")

    x, w1, b1 = make((6, 10), 8, torch.float32, "cpu")
    _, w2, _ = make((6, 8), 3, torch.float32, "cpu")
    got = torch.compile(mlp, fullgraph=True)(x, w1, b1, w2)
    got.sum().backward()
    grads = [t.grad.clone() for t in (x, w1, b1, w2)]
    for t in (x, w1, b1, w2):
        t.grad = None
    expected = mlp(x, w1, b1, w2)
    expected.sum().backward()
    assert_close(got, expected)
    for g, t in zip(grads, (x, w1, b1, w2)):
        assert_close(g, t.grad)


@pytest.mark.parametrize(
    "args, error, match",
    [
        (lambda: ([1.0], torch.randn(3, 1)), TypeError, "input must be a torch.Tensor"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4, 1)), ValueError, "weight must have 2 dimensions"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 5)), ValueError, "input's last dimension 4 does not match"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4, dtype=torch.float64)), TypeError, "weight has dtype"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.randn(4)), ValueError, "bias must have weight.shape"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), None, "gelu"), ValueError, "act must be"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4, device="meta")), ValueError, "weight is on meta but input"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, dtype=torch.float64)), TypeError,
         "bias has dtype"),
        (lambda: (torch.randn(2, 4), torch.randn(3, 4), torch.randn(1, 3)), ValueError, "bias must have 1 dim"),
    ],
)
def test_bad_input(args, error, match):
    values = args()
    x, w = values[0], values[1]
    b = values[2] if len(values) > 2 else None
    act = values[3] if len(values) > 3 else None
    with pytest.raises(error, match=match):
        F.linear(x, w, b, act=act)
    if isinstance(x, torch.Tensor):
        with pytest.raises(error, match=match):
            torch.ops.fastcnn.linear(x, w, b, act)


def test_module_drop_in(backend_device):
    """fastcnn.nn.Linear: torch.nn.Linear's parameters, initialisation and state_dict keys."""
    _, device = backend_device
    torch.manual_seed(5)
    ref = torch.nn.Linear(12, 7, device=device)
    torch.manual_seed(5)
    fused = fastcnn.nn.Linear(12, 7, device=device, activation="relu")
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fused.parameters(), ref.parameters()))
    x = torch.randn(3, 5, 12, device=device, requires_grad=True)
    got = fused(x)
    expected = torch.relu(ref(x))
    assert_close(got, expected, scale=reduction_scale(12))
    got.sum().backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in fused.parameters())]
    x.grad = None
    expected.sum().backward()
    for g, e in zip(grads, [x.grad, *(p.grad for p in ref.parameters())]):
        assert_close(g, e, scale=reduction_scale(15))
    plain = fastcnn.nn.Linear(12, 7, bias=False, device=device)
    plain.load_state_dict({"weight": ref.weight.detach()}, strict=True)
    assert_close(plain(x.detach()), x.detach() @ ref.weight.detach().t(), scale=reduction_scale(12))
