"""Shared test set-up: which backends run here, the per-dtype tolerances, and
poisoned allocations.

Without a GPU the Triton kernels run on the CPU under TRITON_INTERPRET=1, so the
`triton` backend is tested everywhere (on small shapes)."""

import math
import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastcnn  # noqa: E402
from fastcnn import backends  # noqa: E402


def pytest_configure(config):
    """Under pytest-xdist (`-n N`, as `make test` runs), each of the N workers gets an
    equal share of the cores for its OpenMP threads (torch's and fastcnn._cpu's):
    two workers each spinning up a thread per core run the suite slower than one
    process. Set before the workers start, so they read it when their runtimes start;
    an OMP_NUM_THREADS already set is kept. Tests of thread-count independence set
    their own counts."""
    workers = getattr(config.option, "numprocesses", None)  # xdist has turned "auto" into a count by now
    if isinstance(workers, int) and workers > 0 and "OMP_NUM_THREADS" not in os.environ:
        os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cores() // workers))


def usable_cores() -> int:
    """The cores this process may run on (a container's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pytest_collection_modifyitems(config, items):
    """Tests marked `heavy` (minutes under valgrind, a compiler or two processes) run
    first: a worker of `pytest -n` that picks one up near the end would keep the
    whole suite waiting for it."""
    items.sort(key=lambda item: item.get_closest_marker("heavy") is None)


# One table of tolerances for every test: (rtol, atol) per dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual, expected, *, dtype=None, equal_nan=False, scale=1.0):
    """assert_close with the tolerance of `dtype` (default: expected's). `scale` widens
    both tolerances for results that sum many terms (a pooling window, a reduction)."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    torch.testing.assert_close(actual, expected, rtol=rtol * scale, atol=atol * scale, equal_nan=equal_nan)


def assert_close_normwise(actual, expected, *, dtype=None, scale=1.0):
    """Error measured against the tensor's largest magnitude: max|actual - expected|
    <= rtol * scale * max|expected|, with rtol of `dtype` (default: expected's). For
    the outputs and gradients of a whole network, where cancellation leaves some
    elements far smaller than the rounding of the sums that produced them (a batch
    norm over few values, a gradient summed through many layers), so an element's
    own relative error says nothing."""
    rtol, atol = TOLERANCES[dtype or expected.dtype]
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    # Max-norms as single reductions (no |x| tensor): a VGG classifier's gradient has 10^8 elements.
    bound = max(rtol * scale * torch.linalg.vector_norm(expected, ord=math.inf).item(), atol)
    error = torch.dist(actual, expected, p=math.inf).item()  # NaN anywhere fails the comparison below
    assert error <= bound, f"max error {error:.3g} exceeds {bound:.3g} (rtol {rtol} x scale {scale:.3g} x max|expected|)"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max|actual - expected| / max|expected|, with expected the exact (float64) answer."""
    return (torch.dist(actual.double(), expected, p=math.inf) / torch.linalg.vector_norm(expected, ord=math.inf)).item()


def reduction_scale(terms: int) -> float:
    """Tolerance multiplier (assert_close's `scale`) for values that each sum `terms`
    products, as a convolution or matrix product does: the relative rounding error of a
    running sum grows like the square root of its length; sums of up to 16 terms keep
    the plain tolerance."""
    return max(1.0, terms ** 0.5 / 4)


def act_grad_from_output(grad, out, act):
    """The gradient before an activation, from its output, with PyTorch's own backward
    formulas: what torch's autograd (and fastcnn) compute. References use it with the
    output under test, so that an output within rounding of 0 cannot flip ReLU's mask
    between the two sides."""
    if act == "relu":
        return torch.ops.aten.threshold_backward(grad, out, 0)
    if act == "tanh":
        return torch.ops.aten.tanh_backward(grad, out)
    if act == "sigmoid":
        return torch.ops.aten.sigmoid_backward(grad, out)
    return grad


def assert_same_output_on_1_and_2_threads(script: str) -> None:
    """Runs a Python script under OMP_NUM_THREADS=1 and =2: it must print the same
    (non-empty) text, i.e. the CPU kernels' results do not depend on the thread count."""
    results = []
    for threads in ("1", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads)
        run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        results.append(run.stdout)
    assert results[0] == results[1] and results[0]


def dispatched_ops(fn, *args):
    """(fn(*args) under no_grad, [op names in call order]): every op that reached the
    dispatcher below autograd, aten and fastcnn alike ("aten.relu",
    "fastcnn.conv2d"), i.e. one per kernel launched; allocations are left out."""
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = []

    class Recording(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Recording():
        result = fn(*args)
    return result, [op for op in ops if op not in ("aten.empty", "aten.empty_strided")]


def randomize_batch_norm(model, seed=0):
    """Running statistics and affine parameters of every BatchNorm away from their
    identity start, so that BatchNorm (and folding it) changes something."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 2 + 0.25)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=gen))
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.5)
    return model


def backend_devices():
    """(backend, device) pairs that can run here."""
    pairs = [(b, "cpu") for b in backends.available_backends("cpu")]
    if torch.cuda.is_available():
        pairs += [(b, "cuda") for b in backends.available_backends("cuda")]
    return pairs


BACKEND_DEVICES = backend_devices()
BACKEND_IDS = [f"{b}-{d}" for b, d in BACKEND_DEVICES]
# Without a GPU the CUDA-side pairs still appear, as skipped, so a run says what it left out.
_NO_GPU = [] if torch.cuda.is_available() else [
    pytest.param((b, "cuda"), id=f"{b}-cuda", marks=pytest.mark.skip(reason="needs a CUDA device"))
    for b in ("triton", "cuda")]


@pytest.fixture(params=[*[pytest.param(p, id=i) for p, i in zip(BACKEND_DEVICES, BACKEND_IDS)], *_NO_GPU])
def backend_device(request):
    """Runs the test once per (backend, device) pair, with that backend selected. The
    cpu backend's tests run on at least two OpenMP threads (where there are two cores)
    even in a worker of `pytest -n` that got one: its kernels split work by the thread
    count, and those splits are what they test."""
    backend, device = request.param
    threads = torch.get_num_threads()
    if backend == "cpu":
        torch.set_num_threads(max(threads, min(2, usable_cores())))
    try:
        with fastcnn.use_backend(backend):
            yield backend, device
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def poisoned_allocations():
    """Every torch.empty in a test comes back filled with NaN (integers with their
    maximum), so an output element a kernel forgets to write fails the comparison."""
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = fill
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


@pytest.fixture
def exact_float32():
    """TF32 off on the GPU, so that float32 convolutions and matrix products are float32
    (as the references are); modules that need it use it for every test."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def make_input(shape, dtype, device, layout="nchw", requires_grad=False, seed=None):
    """Fresh random input in one of three layouts: nchw, channels_last, or a
    non-contiguous slice (every other column of a wider tensor)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    wide = list(shape)
    if layout == "strided":
        wide[-1] *= 2
    t = torch.randn(wide, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    if layout == "channels_last":
        t = t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        t = t[..., ::2]
        assert shape[-1] == 1 or not t.is_contiguous()
    return t.requires_grad_(requires_grad)


LAYOUTS = ["nchw", "channels_last", "strided"]
