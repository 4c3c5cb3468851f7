"""fastcnn.ops.prepared: eager inference calls run a launcher prepared on the first
call with their signature. Each prepared op against PyTorch, called repeatedly with
fresh data (the launcher reads pointers, not values, so every call must see its own
tensors), in every dtype and layout; signatures that differ get their own launcher;
bad input still raises the error naming the argument; calls that need autograd or
a mode take the op's usual path."""

import pytest
import torch
import torch.nn.functional as torch_F

import fastcnn
from fastcnn import functional as F
from fastcnn.ops import prepared
from conftest import BACKEND_DEVICES, BACKEND_IDS, assert_close, make_input, reduction_scale

CPU_BACKENDS = [pytest.param(b, id=i) for (b, d), i in zip(BACKEND_DEVICES, BACKEND_IDS) if d == "cpu"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _cases(dtype, device):
    """(name, fastcnn call, PyTorch reference, tolerance scale) per prepared op, on fresh
    random data each time they are called."""
    def conv(layout):
        x = make_input((2, 5, 9, 8), dtype, device, layout)
        w, b = torch.randn(6, 5, 3, 3, dtype=dtype, device=device), torch.randn(6, dtype=dtype, device=device)
        r = make_input((2, 6, 5, 8), dtype, device, layout)
        return (lambda: F.conv2d(x, w, b, stride=(2, 1), padding=1, residual=r, act="relu"),
                lambda: torch.relu(torch_F.conv2d(x.double(), w.double(), b.double(), (2, 1), 1) + r.double()))

    def conv_into(layout):
        x = make_input((2, 5, 7, 7), dtype, device, layout)
        w = torch.randn(3, 5, 1, 1, dtype=dtype, device=device)
        out = make_input((2, 8, 7, 7), dtype, device, layout)
        before = out.double().clone()

        def run():
            y = F.conv2d(x, w, act="relu", out=out, channel_offset=4)
            assert torch.equal(out[:, :4].double(), before[:, :4]) and torch.equal(out[:, 7:].double(), before[:, 7:])
            return y

        return run, lambda: torch.relu(torch_F.conv2d(x.double(), w.double()))

    def linear():
        x = torch.randn(3, 2, 17, dtype=dtype, device=device)
        w, b = torch.randn(9, 17, dtype=dtype, device=device), torch.randn(9, dtype=dtype, device=device)
        return (lambda: F.linear(x, w, b, act="tanh"), lambda: torch.tanh(torch_F.linear(x.double(), w.double(),
                                                                                            b.double())))

    def pools(layout):
        x = make_input((2, 4, 11, 10), dtype, device, layout)
        return [
            ("max_pool2d", lambda: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
             lambda: torch_F.max_pool2d(x.double(), 3, 2, 1, ceil_mode=True), 1.0),
            ("avg_pool2d", lambda: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
             lambda: torch_F.avg_pool2d(x.double(), 3, 2, 1, count_include_pad=False), 3.0),
            ("global_avg_pool2d", lambda: F.global_avg_pool2d(x),
             lambda: torch_F.adaptive_avg_pool2d(x.double(), 1), 3.0),
        ]

    for layout in ("nchw", "channels_last"):
        yield (f"conv2d-{layout}", *conv(layout), reduction_scale(45))
        yield (f"conv2d_into-{layout}", *conv_into(layout), reduction_scale(5))
        if layout == "nchw" or dtype != torch.bfloat16:
            yield from ((f"{name}-{layout}", *rest) for name, *rest in pools(layout))
    yield ("linear", *linear(), reduction_scale(17))
    # 2-D input and weight with transposed strides (the backward's products): a launch with
    # every stride bound at preparation.
    xt = torch.randn(17, 5, dtype=dtype, device=device).t()
    wt = torch.randn(17, 9, dtype=dtype, device=device).t()
    yield ("linear-2d-transposed", lambda: F.linear(xt, wt, act="relu"),
           lambda: torch.relu(torch_F.linear(xt.double(), wt.double())), reduction_scale(17))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_prepared_calls_match_pytorch_on_fresh_data(backend, dtype):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip("the Triton interpreter runs float32 here")
    prepared.clear()
    with fastcnn.use_backend(backend), torch.no_grad():
        for call in range(3):  # the first prepares, the others reuse; fresh data every time
            for name, run, reference, scale in _cases(dtype, "cpu"):
                expected = reference()
                got = run()
                assert got.dtype == dtype, name
                assert_close(got.double(), expected, dtype=dtype, scale=scale)
    assert prepared._PREPARED and all(run is not None for run in prepared._PREPARED.values())


def test_outputs_keep_the_layout_of_the_usual_path():
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4, 3, 3, 3)
    with torch.no_grad():
        for _ in range(2):
            assert F.conv2d(x, w).is_contiguous(memory_format=torch.channels_last)
            assert F.max_pool2d(x, 2).is_contiguous(memory_format=torch.channels_last)
            assert F.avg_pool2d(x, 2).is_contiguous(memory_format=torch.channels_last)
            assert F.global_avg_pool2d(x).is_contiguous(memory_format=torch.channels_last)
            assert F.conv2d(x.contiguous(), w).is_contiguous()


def test_each_signature_gets_its_own_launcher():
    prepared.clear()
    w = torch.randn(4, 3, 3, 3)
    with torch.no_grad():
        for shape in ((1, 3, 8, 8), (2, 3, 8, 8), (1, 3, 9, 8)):
            x = torch.randn(shape)
            assert_close(F.conv2d(x, w, padding=1), torch_F.conv2d(x, w, padding=1), scale=reduction_scale(27))
        x = torch.randn(1, 3, 8, 8)
        F.conv2d(x, w, padding=(1, 1))  # keyed by the arguments as given
        F.conv2d(x.double(), w.double(), padding=1)
        with fastcnn.use_backend("torch"):
            F.conv2d(x, w, padding=1)
    assert len(prepared._PREPARED) == 6


def test_bad_input_still_names_the_argument_after_a_good_call():
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    with torch.no_grad():
        F.conv2d(x, w)
        with pytest.raises(ValueError, match="input has 2 channels"):
            F.conv2d(x[:, :2], w)
        with pytest.raises(TypeError, match="padding must be an int, a pair of ints"):
            F.conv2d(x, w, padding=(1, 1, 1, 1))
        F.max_pool2d(x, 2)
        with pytest.raises(ValueError, match="padding .* must be at most half of kernel_size"):
            F.max_pool2d(x, 2, padding=2)
        F.linear(torch.randn(2, 5), torch.randn(3, 5))
        with pytest.raises(ValueError, match="does not match weight.shape\\[1\\]"):
            F.linear(torch.randn(2, 4), torch.randn(3, 5))


def _grad_cases(dtype, layout):
    """(name, inputs, fastcnn call, PyTorch reference, tolerance scale) with every input
    requiring grad, on fresh random data each time. Activations whose gradient cannot
    flip on rounding (tanh, sigmoid), so the reference needs no output of ours."""
    def fresh(*shape, lay="nchw"):
        return make_input(shape, dtype, "cpu", lay, requires_grad=True)

    x, w, b, r = fresh(2, 5, 9, 8, lay=layout), fresh(6, 5, 3, 3), fresh(6), fresh(2, 6, 5, 8, lay=layout)
    yield ("conv2d", (x, w, b, r),
           lambda x, w, b, r: F.conv2d(x, w, b, stride=(2, 1), padding=1, residual=r, act="tanh"),
           lambda x, w, b, r: torch.tanh(torch_F.conv2d(x, w, b, (2, 1), 1) + r), reduction_scale(45))
    x, w = fresh(2, 4, 7, 7, lay=layout), fresh(3, 4, 1, 1)
    yield ("conv2d 1x1 no bias", (x, w), lambda x, w: F.conv2d(x, w, act="sigmoid"),
           lambda x, w: torch.sigmoid(torch_F.conv2d(x, w)), reduction_scale(98))
    x, w, b = fresh(3, 2, 17), fresh(9, 17), fresh(9)
    yield ("linear", (x, w, b), lambda x, w, b: F.linear(x, w, b, act="sigmoid"),
           lambda x, w, b: torch.sigmoid(torch_F.linear(x, w, b)), reduction_scale(17))
    x = fresh(2, 4, 11, 10, lay=layout)
    yield ("avg_pool2d", (x,), lambda x: F.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
           lambda x: torch_F.avg_pool2d(x, 3, 2, 1, count_include_pad=False), 3.0)
    x = fresh(2, 4, 11, 10, lay=layout)
    yield ("max_pool2d", (x,), lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True),
           lambda x: torch_F.max_pool2d(x, 3, 2, 1, ceil_mode=True), 1.0)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_calls_autograd_records_are_prepared_too(dtype, layout):
    """A call that needs a gradient applies the op's autograd Function over a prepared
    launch, and the backward formulas' calls (direct.call) run prepared bodies: outputs
    and gradients match PyTorch's call after call on fresh data (a launcher that kept
    the first call's tensors would fail), for dense and for expanded (stride 0) output
    gradients (a signature whose backward launchers fall back to the op's body)."""
    prepared.clear()
    for call in range(3):
        for name, inputs, fastcnn_call, reference, scale in _grad_cases(dtype, layout):
            got = fastcnn_call(*inputs)
            assert type(got.grad_fn).__name__.endswith("_functionBackward"), name
            exact = [t.detach().double().requires_grad_() for t in inputs]
            expected = reference(*exact)
            assert_close(got.double(), expected, dtype=dtype, scale=scale)
            for grad in (torch.randn_like(got), torch.ones((), dtype=dtype).expand(got.shape)):
                grads = torch.autograd.grad(got, inputs, grad, retain_graph=True)
                for g, e, t in zip(grads, torch.autograd.grad(expected, exact, grad.double(), retain_graph=True),
                                   inputs):
                    assert g.shape == t.shape, name
                    assert_close(g.double(), e, dtype=dtype, scale=scale * 4)
    ops = {key[0] for key, run in prepared._PREPARED.items() if run is not None}
    assert {"conv2d", "linear", "avg_pool2d", "fastcnn::conv2d_input_grad", "fastcnn::conv2d_weight_grad",
            "fastcnn::bias_act_backward", "fastcnn::linear", "fastcnn::avg_pool2d_backward",
            "fastcnn::max_pool2d_backward"} <= ops


def test_modes_take_the_usual_path():
    prepared.clear()
    x, w = torch.randn(1, 3, 8, 8, requires_grad=True), torch.randn(4, 3, 3, 3)
    with torch.device("cpu"):  # a function mode
        y = F.conv2d(x, w, act="relu")
        assert type(y.grad_fn).__name__ != "fastcnn_conv2d_functionBackward"  # the op's own autograd
        with torch.no_grad():
            F.conv2d(x, w)
    assert not prepared._PREPARED


def test_other_layouts_take_the_usual_path():
    prepared.clear()
    w = torch.randn(3, 5)
    with torch.no_grad():
        with pytest.raises(TypeError, match="input must be a dense \\(strided\\) tensor, got layout torch.sparse_coo"):
            F.linear(torch.randn(2, 5).to_sparse(), w)
        with pytest.raises(TypeError, match="weight must be a dense"):
            F.conv2d(torch.randn(1, 3, 5, 5), torch.randn(4, 3, 3, 3).to_sparse())
    assert not prepared._PREPARED


def test_empty_batch():
    w = torch.randn(4, 3, 3, 3)
    with torch.no_grad():
        for _ in range(2):
            assert F.conv2d(torch.randn(0, 3, 8, 8), w).shape == (0, 4, 6, 6)
            assert F.max_pool2d(torch.randn(0, 3, 8, 8), 2).shape == (0, 3, 4, 4)
            assert F.linear(torch.randn(0, 5), torch.randn(3, 5)).shape == (0, 3)


def test_bound_triton_launches_unwrapped_and_restores_the_flag():
    """A prepared Triton launch runs with torch's wrap_triton tracing off (a direct
    launch) and leaves the flag as it found it, also when the launch raises."""
    from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled

    from fastcnn.ops.launch import bound_triton
    seen = []

    def launch(fail):
        seen.append(is_wrap_triton_enabled())
        if fail:
            raise RuntimeError("launch failed")
        return "ran"
    run = bound_triton(torch.device("cpu"), launch)
    for outer in (True, False):
        with set_wrap_triton_enabled(outer):
            assert run(False) == "ran"
            with pytest.raises(RuntimeError, match="launch failed"):
                run(True)
            assert is_wrap_triton_enabled() is outer
    assert seen == [False] * 4
