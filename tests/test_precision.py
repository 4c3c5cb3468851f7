"""fastcnn/ops/precision.py: whether float32 convolutions and matrix products may use
TF32, read as torch decides it for cuDNN and cuBLAS, through the fp32_precision
settings (the legacy allow_tf32 getters raise once those have been set)."""

import pytest
import torch

import fastcnn
from fastcnn import functional as F
from fastcnn.ops.precision import conv_allows_tf32, matmul_allows_tf32
from conftest import assert_close, reduction_scale

SETTINGS = {  # name -> the object holding that fp32_precision
    "global": torch.backends, "cudnn": torch.backends.cudnn, "conv": torch.backends.cudnn.conv,
    "matmul": torch.backends.cuda.matmul,
}


@pytest.fixture
def restored_precision():
    saved = {name: s.fp32_precision for name, s in SETTINGS.items()}
    yield
    for name in ("global", "cudnn", "conv", "matmul"):  # parents first: children may follow them
        SETTINGS[name].fp32_precision = saved[name]


@pytest.mark.parametrize("settings, conv, matmul", [
    ({"conv": "ieee"}, False, False),
    ({"conv": "tf32", "matmul": "tf32"}, True, True),
    ({"conv": "none", "cudnn": "none", "global": "tf32", "matmul": "none"}, True, True),
    ({"conv": "none", "cudnn": "ieee", "global": "tf32", "matmul": "ieee"}, False, False),
    ({"conv": "none", "cudnn": "none", "global": "none", "matmul": "none"}, False, False),
], ids=["conv-ieee", "tf32", "inherited-tf32", "inherited-ieee", "all-none"])
def test_follows_fp32_precision(restored_precision, settings, conv, matmul):
    for name in ("global", "cudnn", "conv", "matmul"):
        if name in settings:
            SETTINGS[name].fp32_precision = settings[name]
    assert conv_allows_tf32() is conv
    assert matmul_allows_tf32() is matmul


@pytest.mark.parametrize("allowed", [False, True])
def test_follows_legacy_flags(allowed):
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        assert conv_allows_tf32() is allowed
        assert matmul_allows_tf32() is allowed
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("device", [
    pytest.param("cpu", marks=pytest.mark.skipif("triton" not in fastcnn.available_backends("cpu"),
                                                  reason="needs Triton's interpreter")),
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
])
def test_triton_ops_run_after_the_new_settings(restored_precision, device):
    """The Triton conv and linear read the settings on every launch: with cuDNN conv
    and cuBLAS matmul set through the new API to different values (where the legacy
    getters raise), both still run and give torch's result."""
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    x, w = torch.randn(2, 3, 6, 6, device=device), torch.randn(4, 3, 3, 3, device=device)
    a, b = torch.randn(5, 16, device=device), torch.randn(7, 16, device=device)
    with fastcnn.use_backend("triton"):
        conv, fc = F.conv2d(x, w, padding=1), F.linear(a, b)
    assert_close(conv, torch.nn.functional.conv2d(x, w, padding=1), scale=reduction_scale(3 * 9))
    if device == "cpu":  # the GPU may round the inputs to TF32, as it was told it may
        assert_close(fc, a @ b.T, scale=reduction_scale(16))


def test_tf32_reader_reads_the_flags_for_float32_only():
    from fastcnn.ops.precision import tf32_reader
    calls = []

    def allows():
        calls.append(1)
        return True
    assert tf32_reader(torch.float32, allows)() is True
    for dtype in (torch.float16, torch.bfloat16, torch.float64):
        assert tf32_reader(dtype, allows)() is False
    assert len(calls) == 1


def test_dot_chooser_matches_dot_mode():
    from fastcnn.triton import conv2d as triton_conv
    for device in (torch.device("cpu"), torch.device("cuda", 0)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            choose = triton_conv.dot_chooser(dtype, device)
            for allow in (False, True):
                assert choose(allow) == triton_conv.dot_mode(dtype, allow, device), (device, dtype, allow)
