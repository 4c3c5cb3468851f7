"""fastcnn.transfer: freeze/unfreeze (parameters and BatchNorm statistics), replace_head
for every model family, and precompute_features / FeatureDataset (training a head on
stored features equals training through the frozen backbone; resuming after an
interruption; refusing another backbone)."""

import copy
import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from fastcnn import models
from fastcnn import nn as fnn
from fastcnn import transfer
from fastcnn.transfer import (FeatureDataset, freeze, head_names, headless, precompute_features, replace_head,
                              trainable_parameters, unfreeze)


def lenet(seed=0, **kwargs):
    torch.manual_seed(seed)
    return models.lenet5(num_classes=10, **kwargs)


def small_bn_net():
    """conv -> BN-ReLU -> conv -> BN -> pool -> FC: BatchNorm in and out of the frozen part."""
    torch.manual_seed(0)
    return nn.Sequential(fnn.Conv2d(3, 4, 3), fnn.BatchNorm2dReLU(4), fnn.Conv2d(4, 4, 3), nn.BatchNorm2d(4),
                         fnn.AdaptiveAvgPool2d(1), nn.Flatten(), fnn.Linear(4, 5))


class Images(torch.utils.data.Dataset):
    """n random 1x32x32 images with labels; counts reads, raises on item `fail_at`."""

    def __init__(self, n, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 1, 32, 32, generator=gen)
        self.labels = torch.randint(0, 10, (n,), generator=gen)
        self.reads = []
        self.fail_at = None

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        self.reads.append(i)
        return self.images[i], self.labels[i]


# --- freeze -------------------------------------------------------------------------------

def test_freeze_until_a_named_layer_leaves_later_layers_trainable():
    model = lenet()
    freeze(model, until="features.3")
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias"}
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name in frozen), name
    assert trainable_parameters(model) == [p for name, p in model.named_parameters() if name not in frozen]


def test_freeze_until_a_container_freezes_all_inside_it():
    model = models.resnet18(num_classes=10)
    freeze(model, until="layer2")
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith(("layer3.", "layer4.", "fc.")), name


def test_freeze_none_freezes_all_but_the_head():
    model = lenet()
    freeze(model)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["classifier.4.weight",
                                                                                   "classifier.4.bias"]
    with torch.device("meta"):
        googlenet = freeze(models.googlenet(num_classes=10))
    assert {name.rsplit(".", 1)[0] for name, p in googlenet.named_parameters() if p.requires_grad} == {
        "fc", "aux1.fc2", "aux2.fc2"}


def test_unfreeze_makes_everything_trainable_again():
    model = freeze(small_bn_net())
    unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())
    model.train()
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("until", [None, "3"])
def test_frozen_batch_norm_keeps_its_statistics_in_train_mode(until):
    model = freeze(small_bn_net(), until=until)
    bns = [model[1], model[3]]
    for bn in bns:  # away from the initial statistics so that an update would show
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    before = copy.deepcopy(model.state_dict())
    model.train()
    assert not any(bn.training for bn in bns)
    assert model.training and model[6].training
    x = torch.randn(4, 3, 9, 9)
    out = model(x)
    out.sum().backward()
    for key, value in model.state_dict().items():
        if key.startswith(("1.", "3.")):
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    # eval-mode output == what the frozen network computed in train mode
    model.eval()
    torch.testing.assert_close(model(x), out)
    assert all(p.grad is None for p in model[:6].parameters())
    assert model[6].weight.grad is not None


def test_frozen_batch_norm_survives_deepcopy_and_pickle():
    model = freeze(small_bn_net())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        assert not clone[1].training and not clone[3].training and clone[6].training
        assert clone[1].train.args[0] is clone[1]  # bound to the copy, not to the original


def test_unfrozen_batch_norm_updates_again():
    model = unfreeze(freeze(small_bn_net()))
    model.train()
    before = model[1].running_mean.clone()
    model(torch.randn(4, 3, 9, 9))
    assert not torch.equal(model[1].running_mean, before)


def test_freeze_bad_until():
    with pytest.raises(ValueError, match="until='features.99'"):
        freeze(lenet(), until="features.99")
    with pytest.raises(ValueError, match="until='' names the model itself"):
        freeze(lenet(), until="")
    with pytest.raises(TypeError, match="until"):
        freeze(lenet(), until=3)


# --- replace_head -------------------------------------------------------------------------

HEAD_CASES = {  # builder name -> (kwargs, input (C, H, W), head layer names)
    "lenet5": ({}, (1, 32, 32), ["classifier.4"]),
    "alexnet": ({}, (3, 64, 64), ["classifier.6"]),
    "alexnet_original": ({}, (3, 227, 227), ["classifier.6"]),
    "vgg11_bn": ({}, (3, 32, 32), ["classifier.6"]),
    "resnet18": ({}, (3, 64, 64), ["fc"]),
    "resnet50": ({}, (3, 64, 64), ["fc"]),
    "nin": ({}, (3, 96, 96), ["features.7.4"]),
    "googlenet": ({}, (3, 64, 64), ["fc", "aux1.fc2", "aux2.fc2"]),
    "googlenet_no_aux": ({"aux_logits": False}, (3, 64, 64), ["fc"]),
}


@pytest.mark.parametrize("case", HEAD_CASES)
def test_replace_head_shapes_and_keys(case):
    kwargs, shape, heads = HEAD_CASES[case]
    with torch.device("meta"):  # shapes only: nothing allocated
        model = models.get_model(case.removesuffix("_no_aux"), num_classes=1000, **kwargs)
    assert head_names(model) == heads
    keys = {k: v.shape for k, v in model.state_dict().items()}
    old = [model.get_submodule(h) for h in heads]
    assert replace_head(freeze(model), 7) is model
    new_keys = {k: v.shape for k, v in model.state_dict().items()}
    assert new_keys.keys() == keys.keys()
    changed = {k for k in keys if keys[k] != new_keys[k]}
    assert changed == {f"{h}.{p}" for h in heads for p in ("weight", "bias")}
    for h, o in zip(heads, old):
        new = model.get_submodule(h)
        assert new is not o and type(new).__module__.startswith("fastcnn.nn")
        assert new.weight.shape[0] == 7 and new.weight.shape[1:] == o.weight.shape[1:]
        assert getattr(new, "activation", None) == getattr(o, "activation", None)
        assert new.weight.requires_grad and new.weight.device.type == "meta"
    assert model.eval()(torch.empty(2, *shape, device="meta")).shape == (2, 7)
    if case == "googlenet":
        out = model.train()(torch.empty(2, *shape, device="meta"))
        assert [t.shape for t in out] == [(2, 7)] * 3


def test_replace_head_runs_and_trains():
    model = replace_head(freeze(lenet()), 3)
    assert [name for name, p in model.named_parameters() if p.requires_grad] == ["classifier.4.weight",
                                                                                   "classifier.4.bias"]
    out = model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_replace_head_bad_num_classes():
    with pytest.raises(TypeError, match="num_classes"):
        replace_head(lenet(), 2.0)
    with pytest.raises(ValueError, match="num_classes"):
        replace_head(lenet(), 0)


# --- precompute_features ------------------------------------------------------------------

def test_headless_outputs_what_the_head_reads():
    model = lenet().eval()
    x = torch.randn(3, 1, 32, 32)
    features = headless(model)(x)
    assert features.shape == (3, 84)
    torch.testing.assert_close(model.classifier[4](features), model(x))
    assert isinstance(model.classifier[4], fnn.Linear)  # the model itself is untouched
    with torch.device("meta"):
        googlenet = models.googlenet(num_classes=10)
        backbone = headless(googlenet)
        assert backbone.aux1 is None and backbone.aux2 is None and googlenet.aux1 is not None
        assert backbone.eval()(torch.empty(2, 3, 64, 64)).shape == (2, 1024)
    with pytest.raises(TypeError, match="NiN"):
        with torch.device("meta"):
            headless(models.nin(num_classes=10))


def test_head_on_stored_features_trains_as_through_the_frozen_backbone(tmp_path):
    data = Images(24)
    model = lenet()
    backbone = headless(model)
    manifest = precompute_features(backbone, data, tmp_path, batch_size=4, shard_size=10)
    assert manifest["complete"] and [s["count"] for s in manifest["shards"]] == [10, 10, 4]
    stored = FeatureDataset(tmp_path)
    assert len(stored) == 24 and stored.feature_shape == (84,)

    def train(net, dataset):
        params = trainable_parameters(net)
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
        losses = []
        for _ in range(3):
            for batch in torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=False):
                x, y = batch
                loss = nn.functional.cross_entropy(net(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        return losses

    through = freeze(copy.deepcopy(model))
    head = copy.deepcopy(model.classifier[4])
    losses_through = train(through, data)
    losses_stored = train(head, stored)
    assert len(losses_stored) == 9 and losses_stored[-1] < losses_stored[0]
    np.testing.assert_allclose(losses_stored, losses_through, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight, through.classifier[4].weight, rtol=1e-5, atol=1e-6)
    # the backbone itself did not move
    for (name, p), q in zip(through.named_parameters(), model.parameters()):
        if not name.startswith("classifier.4."):
            assert torch.equal(p, q), name


def test_stored_features_and_labels_match_the_backbone(tmp_path):
    data = Images(7)
    backbone = headless(lenet()).train()
    backbone.features[2].eval()
    precompute_features(backbone, data, tmp_path, batch_size=3, shard_size=4)
    assert [m.training for m in backbone.modules()] == [m is not backbone.features[2] for m in backbone.modules()]
    stored = FeatureDataset(tmp_path)
    with torch.no_grad():
        expected = backbone.eval()(data.images)
    for i in range(-7, 7):
        feature, label = stored[i]
        torch.testing.assert_close(feature, expected[i])
        assert label == int(data.labels[i])
    with pytest.raises(IndexError):
        stored[7]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["model"]["class"] == "fastcnn.models.lenet.LeNet5"
    assert manifest["model"]["state_dict_sha256"] == transfer.state_dict_sha256(backbone)
    assert manifest["input"] == {"shape": [1, 32, 32], "dtype": "float32"}
    assert manifest["num_samples"] == 7 and manifest["feature"] == {"shape": [84], "dtype": "float32"}
    assert isinstance(stored._features[0], np.memmap)


def shard_files(path):
    return sorted(p.name for p in path.iterdir())


def test_interrupted_precompute_resumes_without_losing_or_duplicating(tmp_path):
    backbone = headless(lenet())
    full = tmp_path / "full"
    precompute_features(backbone, Images(10), full, batch_size=2, shard_size=3)

    data = Images(10)
    part = tmp_path / "part"
    manifest = precompute_features(backbone, data, part, batch_size=2, shard_size=3, max_shards=2)
    assert not manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 1]
    # dataset[0] and dataset[9] first: the input's shape and dtype, the data set's two ends
    assert data.reads == [0, 9] + list(range(6))
    with pytest.raises(ValueError, match="unfinished"):
        FeatureDataset(part)

    # a crash in the middle of shard 2 (a read fails): shard 2 is neither listed nor on disk
    data.reads, data.fail_at = [], 7
    with pytest.raises(KeyboardInterrupt):
        precompute_features(backbone, data, part, batch_size=2, shard_size=3)
    assert data.reads == [0, 9, 0, 3, 6]  # then the first sample of each stored shard
    assert [s["index"] for s in json.loads((part / "manifest.json").read_text())["shards"]] == [0, 1]
    assert "features_00002.npy" not in shard_files(part)

    # a shard written but not yet listed when interrupted is recomputed, not duplicated
    (part / "features_00002.npy").write_bytes(b"garbage")
    (part / "labels_00002.npy.tmp").write_bytes(b"half a shard")
    data.reads, data.fail_at = [], None
    manifest = precompute_features(backbone, data, part, batch_size=2, shard_size=3)
    assert data.reads == [0, 9, 0, 3, 6, 7, 8, 9]  # nothing recomputed
    assert manifest["complete"] and [s["index"] for s in manifest["shards"]] == [0, 1, 2, 3]
    assert shard_files(part) == shard_files(full)  # no stray temporaries
    resumed, reference = FeatureDataset(part), FeatureDataset(full)
    assert len(resumed) == 10
    for i in range(10):
        torch.testing.assert_close(resumed[i][0], reference[i][0], rtol=0, atol=0)
        assert resumed[i][1] == reference[i][1]

    # complete: calling again computes nothing
    data.reads = []
    precompute_features(backbone, data, part, batch_size=2, shard_size=3)
    assert data.reads == [0, 9, 0, 3, 6, 9]


def test_resuming_with_another_backbone_or_data_is_refused(tmp_path):
    model = lenet()
    precompute_features(headless(model), Images(6), tmp_path, shard_size=4, max_shards=1)
    other_weights = headless(model)
    with torch.no_grad():
        other_weights.features[0].weight[0, 0, 0, 0] += 1
    with pytest.raises(ValueError, match="different backbone"):
        precompute_features(other_weights, Images(6), tmp_path, shard_size=4)
    other_activation = headless(lenet(activation="relu"))  # same keys and weights, other network
    other_activation.load_state_dict(headless(model).state_dict())
    with pytest.raises(ValueError, match="different backbone"):
        precompute_features(other_activation, Images(6), tmp_path, shard_size=4)
    with pytest.raises(ValueError, match="num_samples"):
        precompute_features(headless(model), Images(7), tmp_path, shard_size=4)
    with pytest.raises(ValueError, match="shard_size"):
        precompute_features(headless(model), Images(6), tmp_path, shard_size=3)
    with pytest.raises(ValueError, match="different data set"):  # same length and shapes, other images
        precompute_features(headless(model), Images(6, seed=1), tmp_path, shard_size=4)
    precompute_features(headless(model), Images(6), tmp_path, shard_size=4)  # the same one goes on
    assert len(FeatureDataset(tmp_path)) == 6


def test_resuming_with_other_samples_inside_is_refused(tmp_path):
    """The same ends, another image where a stored shard begins."""
    backbone = headless(lenet())
    precompute_features(backbone, Images(6), tmp_path, shard_size=2, max_shards=2)
    changed = Images(6)
    changed.images[2, 0, 0, 0] += 1
    with pytest.raises(ValueError, match="first sample of shard 1"):
        precompute_features(backbone, changed, tmp_path, shard_size=2)


def test_precompute_bad_arguments(tmp_path):
    backbone = headless(lenet())
    with pytest.raises(ValueError, match="batch_size"):
        precompute_features(backbone, Images(2), tmp_path, batch_size=0)
    with pytest.raises(TypeError, match="shard_size"):
        precompute_features(backbone, Images(2), tmp_path, shard_size=2.5)
    with pytest.raises(ValueError, match="empty"):
        precompute_features(backbone, Images(0), tmp_path)
    with pytest.raises(ValueError, match=r"dataset\[1\] is a float32 image of shape \(1, 30, 30\)"):
        precompute_features(backbone, [(torch.randn(1, 32, 32), 0), (torch.randn(1, 30, 30), 1)], tmp_path / "mixed")
    with pytest.raises(FileNotFoundError, match="precompute_features"):
        FeatureDataset(tmp_path / "nothing")
