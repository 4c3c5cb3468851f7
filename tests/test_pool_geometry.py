"""Pooling argument rules and output sizes, against PyTorch over random arguments."""

import pytest
import torch
import torch.nn.functional as tF
from hypothesis import given, settings
from hypothesis import strategies as st

from fastcnn.ops.pool_geometry import pair, pool_params


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), kh=st.integers(1, 5), kw=st.integers(1, 5),
       sh=st.integers(1, 4), sw=st.integers(1, 4), ph=st.integers(0, 3), pw=st.integers(0, 3),
       dh=st.integers(1, 3), dw=st.integers(1, 3), ceil_mode=st.booleans())
def test_max_pool_sizes_and_errors_match_torch(h, w, kh, kw, sh, sw, ph, pw, dh, dw, ceil_mode):
    x = torch.empty(1, 1, h, w)
    args = ((kh, kw), (sh, sw), (ph, pw), (dh, dw), ceil_mode)
    try:
        expected = tF.max_pool2d(x, *args).shape[-2:]
    except RuntimeError:
        with pytest.raises(ValueError):
            pool_params(x, *args)
        return
    assert pool_params(x, *args).output_hw(h, w) == tuple(expected)


@settings(max_examples=200, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), k=st.integers(1, 5), s=st.integers(1, 4),
       p=st.integers(0, 3), ceil_mode=st.booleans())
def test_avg_pool_sizes_and_errors_match_torch(h, w, k, s, p, ceil_mode):
    x = torch.empty(1, 1, h, w)
    try:
        expected = tF.avg_pool2d(x, k, s, p, ceil_mode).shape[-2:]
    except RuntimeError:
        with pytest.raises(ValueError):
            pool_params(x, k, s, p, 1, ceil_mode)
        return
    assert pool_params(x, k, s, p, 1, ceil_mode).output_hw(h, w) == tuple(expected)


def test_stride_defaults_to_kernel():
    assert pool_params(torch.empty(1, 1, 8, 8), 3, None, 0, 1, False).stride == (3, 3)


@pytest.mark.parametrize("bad, name", [((0, 1), "kernel_size"), (-1, "kernel_size"), ((1, 2, 3), "kernel_size"),
                                        (True, "kernel_size"), (2.0, "kernel_size")])
def test_bad_kernel_size(bad, name):
    with pytest.raises((ValueError, TypeError), match=name):
        pool_params(torch.empty(1, 1, 8, 8), bad, None, 0, 1, False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stride=0), "stride"), (dict(padding=-1), "padding"), (dict(padding=2), "padding"),
    (dict(dilation=0), "dilation"), (dict(ceil_mode=1), "ceil_mode"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    args = dict(kernel_size=3, stride=None, padding=0, dilation=1, ceil_mode=False) | kwargs
    with pytest.raises((ValueError, TypeError), match=match):
        pool_params(torch.empty(1, 1, 8, 8), **args)


def test_window_larger_than_input():
    with pytest.raises(ValueError, match="too small"):
        pool_params(torch.empty(1, 1, 2, 2), 3, 1, 0, 1, False)


def test_pair():
    assert pair("k", 3) == (3, 3) and pair("k", [2, 5]) == (2, 5) and pair("k", (4,)) == (4, 4)
