"""fastcnn.ops.packed_weights: CPU convs called with pack_weight=True keep their weight
packed between calls. The result is the same bits as packing in the call; any
change the weight's version counter or data pointer shows packs again; the packed
copy goes when the weight does; fused models turn it on."""

import gc

import pytest
import torch
import torch.nn.functional as torch_F

import fastcnn
from fastcnn import functional as F
from fastcnn.ops import packed_weights
from conftest import assert_close, reduction_scale

pytestmark = pytest.mark.skipif("cpu" not in fastcnn.available_backends("cpu"), reason="needs fastcnn._cpu")


def _conv(x, w, b, **kwargs):
    return F.conv2d(x, w, b, padding=1, act="relu", **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_same_bits_as_packing_in_the_call(dtype, groups):
    x = torch.randn(2, 6, 9, 7, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(12, 6 // groups, 3, 3, dtype=dtype), torch.randn(12, dtype=dtype)
    with torch.no_grad():
        expected = F.conv2d(x, w, b, padding=1, groups=groups, act="relu")
        for _ in range(2):  # packs, then reuses
            got = F.conv2d(x, w, b, padding=1, groups=groups, act="relu", pack_weight=True)
            assert torch.equal(got, expected)
    reference = torch.relu(torch_F.conv2d(x.double(), w.double(), b.double(), padding=1, groups=groups))
    assert_close(got, reference.to(dtype), scale=reduction_scale(9 * 6 // groups))


def test_in_place_changes_and_new_storage_pack_again():
    x = torch.randn(1, 4, 6, 6)
    w, b = torch.randn(8, 4, 3, 3), torch.randn(8)
    with torch.no_grad():
        _conv(x, w, b, pack_weight=True)
        w.mul_(-2)  # in place: the version counter moves
        assert torch.equal(_conv(x, w, b, pack_weight=True), _conv(x, w, b))
        w.copy_(torch.randn(8, 4, 3, 3))
        assert torch.equal(_conv(x, w, b, pack_weight=True), _conv(x, w, b))
    layer = fastcnn.nn.Conv2d(4, 8, 3, padding=1, activation="relu").eval()
    layer.pack_weight = True
    with torch.no_grad():
        layer(x)
        layer.weight.data = torch.randn(8, 4, 3, 3)  # a new storage: a new data pointer
        expected = torch.relu(torch_F.conv2d(x, layer.weight, layer.bias, padding=1))
        assert_close(layer(x), expected, scale=reduction_scale(36))
        layer.load_state_dict({"weight": torch.randn(8, 4, 3, 3), "bias": torch.randn(8)})
        expected = torch.relu(torch_F.conv2d(x, layer.weight, layer.bias, padding=1))
        assert_close(layer(x), expected, scale=reduction_scale(36))


def test_the_packed_copy_goes_with_the_weight():
    x = torch.randn(1, 64, 5, 5)
    gc.collect()  # earlier tests' models left in reference cycles would otherwise go below
    before = packed_weights.packed_bytes()
    w = torch.randn(64, 64, 3, 3)
    with torch.no_grad():
        _conv(x, w, None, pack_weight=True)
    assert packed_weights.packed_bytes() >= before + w.numel() * 4
    del w
    gc.collect()
    assert packed_weights.packed_bytes() == before


def test_depthwise_packs_nothing_and_still_runs():
    x, w = torch.randn(2, 5, 8, 8), torch.randn(5, 1, 3, 3)
    with torch.no_grad():
        got = F.conv2d(x, w, padding=1, groups=5, pack_weight=True)
    assert_close(got, torch_F.conv2d(x, w, padding=1, groups=5), scale=reduction_scale(9))


def test_fused_models_keep_weights_packed():
    model = fastcnn.models.resnet18(num_classes=10).eval()
    fused = model.fuse()
    convs = [m for m in fused.modules() if isinstance(m, fastcnn.nn.Conv2d)]
    assert convs and all(m.pack_weight for m in convs)
    assert not any(m.pack_weight for m in model.modules() if isinstance(m, fastcnn.nn.Conv2d))  # a copy
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        first = fused(x)
        state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v
                 for k, v in fused.state_dict().items()}
        fused.load_state_dict(state)  # the packed copies must follow
        fresh = fastcnn.models.resnet18(num_classes=10).eval().fuse()
        fresh.load_state_dict(state)
        fresh.apply(lambda m: setattr(m, "pack_weight", False) if isinstance(m, fastcnn.nn.Conv2d) else None)
        assert torch.equal(fused(x), fresh(x)) and not torch.equal(fused(x), first)
    traced = fastcnn.fuse(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval())
    assert all(m.pack_weight for m in traced.modules() if isinstance(m, fastcnn.nn.Conv2d))


def test_inference_mode_weights_are_packed_in_the_call():
    """Tensors made under torch.inference_mode track no version: nothing is cached."""
    with torch.inference_mode():
        model = fastcnn.models.lenet5().eval().fuse()
        x = torch.randn(2, 1, 32, 32)
        before = packed_weights.packed_bytes()
        first = model(x)
        model.features[0].weight.mul_(2)  # in place, unseen by any version counter
        second = model(x)
        assert packed_weights.packed_bytes() == before
        reference = model.fuse()  # a copy; pack_weight changes nothing for inference tensors
        reference.apply(lambda m: setattr(m, "pack_weight", False) if isinstance(m, fastcnn.nn.Conv2d) else None)
        assert torch.equal(second, reference(x)) and not torch.equal(first, second)
