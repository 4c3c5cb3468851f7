"""fastcnn.inference: multi_crop against crops taken by hand (torchvision's five_crop
positions), its invariances, and Ensemble's averages and shape checks."""

import pytest
import torch
from torch import nn

from fastcnn import models
from fastcnn import nn as fnn
from fastcnn.inference import Ensemble, crop_boxes, multi_crop
from conftest import TOLERANCES


def lenet(seed):
    torch.manual_seed(seed)
    return models.lenet5(num_classes=10).eval()


class CropRecorder(nn.Module):
    """Returns a few numbers per image and keeps the batch it saw."""

    def forward(self, x):
        self.seen = x
        return torch.stack([x.mean((1, 2, 3)), x[:, 0, 0, 0], x[:, -1, -1, -1]], dim=1)


def manual_crops(image, crops, h, w):
    """torchvision's five_crop positions, then the mirror of each crop, written out."""
    H, W = image.shape[-2:]
    centre = (int(round((H - h) / 2)), int(round((W - w) / 2)))
    tops_lefts = [(0, 0), (0, W - w), (H - h, 0), (H - h, W - w), centre]
    if crops == 1:
        tops_lefts = tops_lefts[-1:]
    out = [image[..., t:t + h, l:l + w] for t, l in tops_lefts]
    if crops == 10:
        out += [image[..., t:t + h, l:l + w].flip(-1) for t, l in tops_lefts]
    return out


@pytest.mark.parametrize("crops", [1, 5, 10])
@pytest.mark.parametrize("hw,size", [((9, 11), (6, 7)), ((8, 8), None), ((5, 7), 5), ((4, 4), 4)])
def test_multi_crop_equals_averaging_manual_crops(crops, hw, size):
    images = torch.randn(3, 2, *hw)
    model = CropRecorder()
    h, w = (size, size) if isinstance(size, int) else size or (hw[0] * 7 // 8, hw[1] * 7 // 8)
    expected_crops = [torch.stack([c for c in manual_crops(img, crops, h, w)]) for img in images]  # per image
    for average in ("logits", "probs"):
        out = multi_crop(model, images, crops=crops, size=size, average=average)
        assert out.shape == (3, 3)
        assert model.seen.shape == (3 * crops, 2, h, w)  # one batch, every crop inside the image
        outs = [model(c) for c in expected_crops]  # (crops, 3) per image
        if average == "probs":
            outs = [o.softmax(1) for o in outs]
        torch.testing.assert_close(out, torch.stack([o.mean(0) for o in outs]))


def test_crop_boxes_lie_inside_the_image():
    for H, W, h, w in [(256, 256, 224, 224), (9, 11, 6, 7), (5, 5, 5, 5), (7, 3, 2, 1)]:
        for top, left in crop_boxes(H, W, h, w):
            assert 0 <= top <= H - h and 0 <= left <= W - w
    assert crop_boxes(256, 256, 224, 224)[-1] == (16, 16)


class MirrorInvariant(nn.Module):
    """LeNet-5 on the image plus its mirror: f(x) == f(flip(x))."""

    def __init__(self):
        super().__init__()
        self.net = lenet(0)

    def forward(self, x):
        return self.net(x) + self.net(x.flip(-1))


def test_ten_crops_of_a_mirror_invariant_model_equal_five():
    images = torch.randn(2, 1, 36, 35)  # odd margin: the centre crop is off-centre, its mirror too
    model = MirrorInvariant().eval()
    for average in ("logits", "probs"):
        torch.testing.assert_close(multi_crop(model, images, 10, 32, average=average),
                                   multi_crop(model, images, 5, 32, average=average))


def test_crops_of_a_crop_and_mirror_invariant_model_equal_one_pass():
    """Global average pooling of a per-pixel layer, on images constant over space: every
    crop and mirror sees the same pixels, so 10 crops average to one full-image pass."""
    torch.manual_seed(0)
    model = nn.Sequential(fnn.Conv2d(3, 5, 1, activation="relu"), fnn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    images = torch.randn(4, 3, 1, 1).expand(4, 3, 13, 10)
    one_pass = model(images)
    torch.testing.assert_close(multi_crop(model, images, 10, average="logits"), one_pass)
    torch.testing.assert_close(multi_crop(model, images, 10), one_pass.softmax(1))


def test_multi_crop_of_lenet_gives_probabilities():
    with torch.no_grad():
        probs = multi_crop(lenet(0), torch.randn(2, 1, 36, 36), crops=10, size=32)
    assert probs.shape == (2, 10)
    torch.testing.assert_close(probs.sum(1), torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_multi_crop_keeps_the_dtype(dtype):
    images = (torch.randn(2, 3, 8, 8) * 100).to(dtype)
    out = multi_crop(CropRecorder(), images, 10, 6)
    assert out.dtype == dtype
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(out.float(), multi_crop(CropRecorder(), images.float(), 10, 6), rtol=rtol, atol=atol)


def test_multi_crop_bad_arguments():
    images = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="crops"):
        multi_crop(CropRecorder(), images, crops=4)
    with pytest.raises(ValueError, match="size"):
        multi_crop(CropRecorder(), images, size=9)
    with pytest.raises(ValueError, match="size"):
        multi_crop(CropRecorder(), images, size=(0, 4))
    for size in ((8.0, 8), (4, 4, 1), "4"):
        with pytest.raises(TypeError, match="size"):
            multi_crop(CropRecorder(), images, size=size)
    with pytest.raises(ValueError, match="crops"):
        multi_crop(CropRecorder(), images, crops=True)
    with pytest.raises(ValueError, match="images"):
        multi_crop(CropRecorder(), images[0])
    with pytest.raises(ValueError, match="average"):
        multi_crop(CropRecorder(), images, average="mean")
    with torch.device("meta"):
        googlenet = models.googlenet(num_classes=3).train()
    with pytest.raises(TypeError, match="eval"):
        multi_crop(googlenet, torch.empty(1, 3, 64, 64, device="meta"), crops=1, size=56)


# --- Ensemble -----------------------------------------------------------------------------

def test_ensemble_averages_outputs_not_weights():
    members = [lenet(seed) for seed in range(3)]
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        outs = torch.stack([m(x) for m in members])
        ensemble = Ensemble(members).eval()
        torch.testing.assert_close(ensemble(x), outs.softmax(2).mean(0))
        torch.testing.assert_close(Ensemble(members, average="logits")(x), outs.mean(0))
    assert len(list(ensemble.parameters())) == sum(len(list(m.parameters())) for m in members)
    assert "average='probs'" in repr(ensemble)


def test_ensemble_is_used_as_one_model():
    members = [lenet(seed) for seed in range(2)]
    x = torch.randn(2, 1, 36, 36)
    ensemble = Ensemble(members)
    ensemble.train()
    assert all(m.training for m in members)
    ensemble.eval()
    with torch.no_grad():
        # 10 crops of an ensemble of probabilities: average its outputs as they are
        combined = multi_crop(ensemble, x, 10, 32, average="logits")
        by_hand = torch.stack([multi_crop(m, x, 10, 32) for m in members]).mean(0)
    torch.testing.assert_close(combined, by_hand)
    torch.testing.assert_close(combined.sum(1), torch.ones(2))
    loaded = Ensemble([lenet(5), lenet(6)])
    loaded.load_state_dict(ensemble.state_dict())
    torch.testing.assert_close(loaded.eval()(x[..., :32, :32]), ensemble(x[..., :32, :32]))


def test_ensemble_gradients_reach_every_member():
    members = [lenet(seed) for seed in range(2)]
    Ensemble(members)(torch.randn(2, 1, 32, 32)).sum().backward()
    assert all(p.grad is not None for m in members for p in m.parameters())


def test_ensemble_checks_its_members():
    with pytest.raises(ValueError, match="models"):
        Ensemble([])
    with pytest.raises(TypeError, match=r"models\[1\]"):
        Ensemble([lenet(0), lambda x: x])
    with pytest.raises(ValueError, match="average"):
        Ensemble([lenet(0)], average="vote")
    torch.manual_seed(0)
    mismatched = Ensemble([lenet(0), models.lenet5(num_classes=4).eval()])
    with pytest.raises(ValueError, match=r"models\[1\] returned shape \(2, 4\)"):
        mismatched(torch.randn(2, 1, 32, 32))
