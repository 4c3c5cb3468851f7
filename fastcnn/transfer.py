"""Transfer learning: take a trained network, freeze most of it and train a new head.

- `freeze(model, until=name)` freezes the parameters and BatchNorm statistics of every
  module up to and including `name`; `until=None` freezes everything but the head.
  `unfreeze(model)` undoes it; `trainable_parameters(model)` is what an optimiser gets.
- `replace_head(model, num_classes)` swaps the final classifier (and GoogLeNet's side
  classifiers) for fresh fastcnn layers; `head_names(model)` says which modules those are.
- `headless(model)` is a copy of the model that outputs what its head reads, and
  `precompute_features(backbone, dataset, path)` runs such a frozen backbone once over a
  data set and stores its activations on disk (sharded .npy files, memory-mapped on
  read, resumable, with a manifest naming the backbone and input that produced them);
  `FeatureDataset(path)` reads them back, so the head trains on stored features.

How much to freeze is the `until` argument: with more data, freeze fewer layers (an
earlier `until`) and precompute from a shorter backbone; nothing else changes.
"""

from __future__ import annotations

import bisect
import copy
import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastcnn import nn as fnn
from fastcnn.models.googlenet import GoogLeNet
from fastcnn.models.nin import NiN

__all__ = ["FeatureDataset", "freeze", "head_names", "headless", "precompute_features", "replace_head",
           "trainable_parameters", "unfreeze"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: the samples' digests (ends_sha256, each shard's first_sha256)


# --- which modules are the head ---------------------------------------------------------

def head_names(model: nn.Module) -> list[str]:
    """Qualified names (as in model.named_modules()) of the layers that produce the class
    scores: NiN's last 1x1 convolution (features[-1][-2]); GoogLeNet's fc and its side
    classifiers' fc2 (where built); any other model's last registered nn.Linear (the
    output layer of LeNet-5, AlexNet, VGG and ResNet)."""
    if isinstance(model, NiN):
        block = len(model.features) - 1
        return [f"features.{block}.{len(model.features[block]) - 2}"]
    if isinstance(model, GoogLeNet):
        return ["fc"] + [f"{aux}.fc2" for aux in ("aux1", "aux2") if getattr(model, aux) is not None]
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise TypeError(f"model ({type(model).__name__}) has no nn.Linear layer to treat as its head")
    return linears[-1:]


def replace_head(model: nn.Module, num_classes: int) -> nn.Module:
    """Replaces the head layers (head_names) in place by freshly initialised fastcnn
    layers with `num_classes` outputs, same input size, bias, activation, device and
    dtype; returns the model. The new layers are trainable whatever freeze() did before."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    for name in head_names(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, _fresh_head(getattr(parent, child), num_classes))
    return model


def _fresh_head(old: nn.Module, num_classes: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return fnn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=old.weight.device,
                          dtype=old.weight.dtype, activation=getattr(old, "activation", None))
    if isinstance(old, nn.Conv2d):
        return fnn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding, old.dilation,
                          bias=old.bias is not None, padding_mode=old.padding_mode, device=old.weight.device,
                          dtype=old.weight.dtype, activation=getattr(old, "activation", None))
    raise TypeError(f"cannot replace a head layer of type {type(old).__name__}")


def headless(model: nn.Module) -> nn.Module:
    """A deep copy of the model whose head layers are nn.Identity, so it outputs the
    features the head reads: the backbone to give precompute_features. Only for models
    whose head is a Linear layer on a flat vector (not NiN, whose head is a convolution
    followed by pooling); GoogLeNet's side classifiers run only in training mode and
    are dropped."""
    if isinstance(model, NiN):
        raise TypeError("headless: NiN's head is a convolution before the global pooling, so its input is a "
                        "feature map, not the pooled vector; cut model.features yourself")
    backbone = copy.deepcopy(model)
    for name in head_names(model):
        parent_name, _, child = name.rpartition(".")
        if child == "fc2":  # GoogLeNet's side classifiers: not part of the inference path
            setattr(backbone, parent_name, None)
        else:
            setattr(backbone.get_submodule(parent_name), child, nn.Identity())
    return backbone


# --- freezing ---------------------------------------------------------------------------

def freeze(model: nn.Module, until: str | None = None) -> nn.Module:
    """Freezes part of the model in place and returns it.

    `until` names a module (a name from model.named_modules(), e.g. "features.3" or
    "layer3"): that module, everything inside it and every module registered before it
    are frozen. The order is registration order, which for fastcnn's models is the
    order of the forward pass (GoogLeNet's side classifiers come after inception5b).
    `until=None` freezes every module but the head (head_names).

    Frozen means: parameters get requires_grad=False (their .grad stays None), and
    frozen BatchNorm layers normalise with their running statistics and never update
    them. For that each frozen BatchNorm is put in eval mode and its own `train` is
    replaced by one that keeps it there, so model.train() (which calls train on every
    submodule) leaves it in eval mode; unfreeze() restores it. Dropout is left alone.
    """
    modules = list(model.named_modules())
    if until is None:
        heads = head_names(model)
        frozen = [(name, m) for name, m in modules
                  if not any(name == h or name.startswith(h + ".") for h in heads)]
    else:
        if not isinstance(until, str):
            raise TypeError(f"until must be a module name (str) or None, got {type(until).__name__}")
        names = [name for name, _ in modules]
        if until == "":  # named_modules' name of the model itself, which holds no layer of its own
            raise ValueError("until='' names the model itself, not one of its layers: name the last module to freeze")
        if until not in names:
            raise ValueError(f"until={until!r} is not a module of {type(model).__name__}; its top-level "
                             f"modules are: {', '.join(name for name, _ in model.named_children())}")
        end = names.index(until) + 1
        while end < len(names) and names[end].startswith(until + "."):
            end += 1
        frozen = modules[:end]
    for name, module in frozen:
        for param in module.parameters(recurse=False):
            param.requires_grad_(False)
        if isinstance(module, _BatchNorm):
            _freeze_batch_norm(module)
    return model


def unfreeze(model: nn.Module) -> nn.Module:
    """Makes every parameter trainable and lets every BatchNorm follow train()/eval()
    again (each takes the model's current mode); returns the model."""
    for param in model.parameters():
        param.requires_grad_(True)
    for module in model.modules():
        if isinstance(module, _BatchNorm) and "train" in module.__dict__:
            del module.train  # the class's own train() again
            nn.Module.train(module, model.training)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters with requires_grad, in model.parameters() order: what to optimise."""
    return [p for p in model.parameters() if p.requires_grad]


def _freeze_batch_norm(bn: _BatchNorm) -> None:
    nn.Module.train(bn, False)
    # An instance attribute shadows the method; a partial of a module-level function
    # survives copy.deepcopy and pickling (torch.save of the whole model).
    bn.train = functools.partial(_stay_in_eval, bn)


def _stay_in_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(module, False)


# --- precomputed features ---------------------------------------------------------------

def precompute_features(backbone: nn.Module, dataset, path: str | os.PathLike, *, batch_size: int = 64,
                        shard_size: int = 4096, device: torch.device | str | None = None,
                        max_shards: int | None = None) -> dict[str, Any]:
    """Runs `backbone` (in eval mode, without autograd) once over `dataset`, a sequence
    of (image tensor, integer label) pairs, and stores the outputs under the directory
    `path`: features_<k>.npy and labels_<k>.npy per shard of `shard_size` samples (in
    dataset order), and manifest.json recording the backbone (class, a hash of its
    printed architecture, a hash of its state_dict), the input's shape and dtype, the
    number of samples, digests of the first and last samples, the shard size and the
    completed shards (each with the digest of its first sample).

    Resumable: each shard is written under a temporary name and renamed once complete,
    and only then listed in the manifest (itself replaced atomically). Called again on
    the same directory, it checks that backbone and data set are the same (ValueError
    otherwise: the data set by its length, input shape and dtype, its first and last
    samples and the first sample of every stored shard, one read per shard) and
    computes only the shards not listed, so an interruption loses at most the shard
    in progress and never duplicates one. `max_shards` stops after that
    many newly computed shards (the manifest then says "complete": false).

    Features are stored in the backbone's output dtype (bfloat16, which numpy lacks, as
    float32). `device` defaults to that of the backbone's first parameter. Returns the
    manifest."""
    _check_positive("batch_size", batch_size)
    _check_positive("shard_size", shard_size)
    if max_shards is not None:
        _check_positive("max_shards", max_shards, allow_zero=True)
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty: nothing to precompute")
    if device is None:
        first = next(backbone.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    image, label = dataset[0]
    if not isinstance(image, Tensor):
        raise TypeError(f"dataset must yield (image tensor, label) pairs, got an image of type {type(image).__name__}")
    ends = [sample_sha256(image, label)] + ([sample_sha256(*dataset[n - 1])] if n > 1 else [])

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    identity = {
        "format": FORMAT_VERSION,
        "model": {"class": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
                  "architecture_sha256": hashlib.sha256(repr(backbone).encode()).hexdigest(),
                  "state_dict_sha256": state_dict_sha256(backbone)},
        "input": {"shape": list(image.shape), "dtype": _dtype_name(image.dtype)},
        "num_samples": n,
        "ends_sha256": ends,
        "shard_size": shard_size,
    }
    manifest = _read_manifest(root)
    if manifest is None:
        manifest = {**identity, "feature": None, "shards": [], "complete": False}
    else:
        _check_same_source(manifest, identity, root)
        for shard in manifest["shards"]:  # one read per stored shard: each began with the same sample
            if sample_sha256(*dataset[shard["start"]]) != shard["first_sha256"]:
                raise ValueError(f"{root} holds features of other data: dataset[{shard['start']}], the first "
                                 f"sample of shard {shard['index']}, differs. Use another path, or delete this "
                                 "one to start over")
    for stale in root.glob("*.tmp"):  # a shard or manifest being written when interrupted
        stale.unlink()

    num_shards = -(-n // shard_size)
    done = {shard["index"] for shard in manifest["shards"]}
    computed = 0
    modes = [(module, module.training) for module in backbone.modules()]
    backbone.eval()
    try:
        for k in range(num_shards):
            if k in done:
                continue
            if max_shards is not None and computed >= max_shards:
                break
            start, stop = k * shard_size, min((k + 1) * shard_size, n)
            features, labels, first_sha256 = _run_shard(backbone, dataset, range(start, stop), batch_size, device,
                                                        identity["input"])
            feature_info = {"shape": list(features.shape[1:]), "dtype": str(features.dtype)}
            if manifest["feature"] is None:
                manifest["feature"] = feature_info
            elif manifest["feature"] != feature_info:
                raise ValueError(f"shard {k}: the backbone output {feature_info}, but earlier shards hold "
                                 f"{manifest['feature']}")
            entry = {"index": k, "start": start, "count": stop - start, "first_sha256": first_sha256,
                     "features": f"features_{k:05d}.npy", "labels": f"labels_{k:05d}.npy"}
            _save_atomically(root / entry["features"], features)
            _save_atomically(root / entry["labels"], labels)
            manifest["shards"] = sorted(manifest["shards"] + [entry], key=lambda s: s["index"])
            manifest["complete"] = len(manifest["shards"]) == num_shards
            _write_manifest(root, manifest)
            computed += 1
    finally:  # each module's own mode back (train(True) would also wake modules kept in eval)
        for module, mode in modes:
            module.training = mode
    if not manifest["shards"]:
        _write_manifest(root, manifest)  # max_shards=0: record the source all the same
    return manifest


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 of the module's state_dict: every key with its tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        tensor = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{key}|{tensor.dtype}|{tuple(value.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sample_sha256(image: Tensor, label) -> str:
    """SHA-256 of one (image, label) sample: the image's dtype, shape and bytes, and the label."""
    flat = image.detach().to("cpu").contiguous().reshape(-1)
    digest = hashlib.sha256(f"{flat.dtype}|{tuple(image.shape)}|{int(label)}|".encode())
    digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _run_shard(backbone: nn.Module, dataset, indices: range, batch_size: int, device: torch.device,
               input_info: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """The shard's features and labels, and the digest of its first sample."""
    feature_batches, labels, first_sha256 = [], [], None
    with torch.no_grad():
        for first in range(indices.start, indices.stop, batch_size):
            images = []
            for i in range(first, min(first + batch_size, indices.stop)):
                image, label = dataset[i]
                if {"shape": list(image.shape), "dtype": _dtype_name(image.dtype)} != input_info:
                    raise ValueError(f"dataset[{i}] is a {_dtype_name(image.dtype)} image of shape "
                                     f"{tuple(image.shape)}; dataset[0] was {input_info['dtype']} "
                                     f"{tuple(input_info['shape'])}")
                if first_sha256 is None:
                    first_sha256 = sample_sha256(image, label)
                images.append(image)
                labels.append(int(label))
            out = backbone(torch.stack(images).to(device))
            if not isinstance(out, Tensor):
                raise TypeError(f"the backbone must return a tensor, got {type(out).__name__}")
            if out.dtype == torch.bfloat16:
                out = out.float()
            feature_batches.append(out.cpu().numpy())
    return np.concatenate(feature_batches), np.asarray(labels, dtype=np.int64), first_sha256


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _check_same_source(manifest: dict, identity: dict, root: Path) -> None:
    for key, expected in identity.items():
        if manifest.get(key) != expected:
            what = {"model": "backbone (class, architecture or state_dict)",
                    "ends_sha256": "data set (its first or last sample differs)"}.get(key, key)
            raise ValueError(f"{root} holds features from a different {what}: stored {manifest.get(key)!r}, "
                             f"now {expected!r}. Use another path, or delete this one to start over")


def _save_atomically(target: Path, array: np.ndarray) -> None:
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, root / MANIFEST)


def _read_manifest(root: Path) -> dict | None:
    file = root / MANIFEST
    if not file.exists():
        return None
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{file} has format {manifest.get('format')!r}; this fastcnn reads format {FORMAT_VERSION}")
    return manifest


def _check_positive(name: str, value, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'non-negative' if allow_zero else 'positive'}, got {value}")


class FeatureDataset(torch.utils.data.Dataset):
    """The features precompute_features stored under `path`, memory-mapped: item i is
    (feature tensor, label) for the data set's item i. `transform`, if given, is applied
    to each feature tensor. Refuses a directory whose precomputation is unfinished."""

    def __init__(self, path: str | os.PathLike, transform: Callable[[Tensor], Tensor] | None = None):
        self.root = Path(path)
        manifest = _read_manifest(self.root)
        if manifest is None:
            raise FileNotFoundError(f"no {MANIFEST} under {self.root}: run precompute_features first")
        if not manifest["complete"]:
            raise ValueError(f"{self.root} holds {len(manifest['shards'])} shards of an unfinished precomputation: "
                             "call precompute_features again to finish it")
        self.manifest = manifest
        self.transform = transform
        shards = manifest["shards"]
        self._features = [np.load(self.root / s["features"], mmap_mode="r") for s in shards]
        self._labels = [np.load(self.root / s["labels"], mmap_mode="r") for s in shards]
        self._starts = [s["start"] for s in shards]
        for s, f, l in zip(shards, self._features, self._labels):
            if len(f) != s["count"] or len(l) != s["count"]:
                raise ValueError(f"{self.root / s['features']}: {len(f)} rows, the manifest says {s['count']}")

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for {n} samples")
        shard = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[shard]
        feature = torch.from_numpy(np.array(self._features[shard][row]))  # a copy: the map is read-only
        if self.transform is not None:
            feature = self.transform(feature)
        return feature, int(self._labels[shard][row])

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        return (self[i] for i in range(len(self)))

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["feature"]["shape"])
