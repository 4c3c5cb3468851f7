"""`python -m fastcnn train`: train one of fastcnn's models on scikit-learn's 8x8 digits
(upscaled to 32x32) or on an image folder, with a progress bar, a checkpoint per epoch,
--resume, and the transfer-learning and test-time tools (--weights of a network
trained elsewhere, --freeze, --ten-crop, --ensemble). Under
`torchrun --nproc-per-node N` (WORLD_SIZE > 1) it trains with DistributedDataParallel:
gloo on the CPU, NCCL on GPUs; --batch-size is per process.

Reproducible: the model is initialised from --seed, and every epoch's sample order is
that of a DistributedSampler seeded with --seed (one replica when not distributed), so
two processes with batch B see, step by step, the same samples as one process with
batch 2B; and a run resumed from its epoch-k checkpoint ends with the weights of an
uninterrupted run.
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import random
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from fastcnn.loader import PrefetchLoader

__all__ = ["add_arguments", "load_digits", "load_image_folder", "main", "run"]

# (channels, side) of the images a model takes; 224x224 RGB for the ImageNet networks.
INPUT_SIZES = {"lenet5": (1, 32), "alexnet_original": (3, 227)}
DEFAULT_INPUT = (3, 224)
CHECKPOINT = re.compile(r"epoch_(\d+)\.pt$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="lenet5", help="a registered model (fastcnn.models.list_models())")
    parser.add_argument("--data", default="digits",
                        help="'digits' (scikit-learn's 8x8 digits, upscaled) or an image folder with one "
                             "sub-folder per class")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per process under torchrun")
    parser.add_argument("--lr", type=float, default=3e-3, help="initial learning rate (cosine decay to 0)")
    parser.add_argument("--optimizer", choices=["adam", "sgd"], default="adam",
                        help="adam, or sgd with momentum 0.9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of the data")
    parser.add_argument("--out", default="checkpoints", help="directory of the per-epoch checkpoints")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="start from these weights: a state_dict or a checkpoint of this command, say of the "
                             "same network trained on another data set; the head layers start afresh where the "
                             "number of classes differs (transfer learning, with --freeze)")
    parser.add_argument("--image-size", type=int, default=None, metavar="SIDE",
                        help="side of the square images the model is trained on (default: what it was designed "
                             "for, 32 for lenet5, 227 for alexnet_original, else 224)")
    parser.add_argument("--freeze", default=None, metavar="NAME",
                        help="freeze every layer up to and including this module (fastcnn.transfer.freeze)")
    parser.add_argument("--augment", action="store_true",
                        help="augment each training batch on its device (fastcnn.data.augment): random crop of "
                             "the image padded by 1/16 of its side, rotation within 10 degrees, and for RGB "
                             "images mirroring")
    parser.add_argument("--ten-crop", action="store_true",
                        help="evaluate on ten crops of each test image (fastcnn.inference.multi_crop)")
    parser.add_argument("--ensemble", type=int, default=1, metavar="N",
                        help="train N models (seeds seed..seed+N-1), evaluate their average "
                             "(fastcnn.inference.Ensemble)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# --- data -------------------------------------------------------------------------------

def load_digits(side: int = 32, test_fraction: float = 0.2, seed: int = 0,
                channels: int = 1) -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's 1797 8x8 digits, bilinearly upscaled to side x side (the grey level
    repeated over `channels`), normalised with the training images' mean and standard
    deviation, split at random (from `seed`)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError:
        raise SystemExit("fastcnn train --data digits needs scikit-learn: pip install 'fastcnn[data]'") from None
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    images = F.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    images = images.expand(-1, channels, -1, -1).contiguous()
    return _split(images, labels, test_fraction, seed)


def load_image_folder(path: str | os.PathLike, channels: int, side: int, test_fraction: float = 0.2,
                      seed: int = 0) -> tuple[TensorDataset, TensorDataset, list[str]]:
    """Every image under path/<class>/ (classes sorted by name), read with PIL, converted to
    `channels` channels, resized to side x side, normalised per channel; split as load_digits."""
    try:
        from PIL import Image
    except ImportError:
        raise SystemExit("fastcnn train --data PATH reads images with PIL: pip install pillow") from None
    root = Path(path)
    if not root.is_dir():
        raise SystemExit(f"fastcnn train: --data {path} is neither 'digits' nor a directory")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise SystemExit(f"fastcnn train: --data {path} has no sub-folder (one per class)")
    mode = {1: "L", 3: "RGB"}[channels]
    images, labels = [], []
    for label, name in enumerate(classes):
        for file in sorted((root / name).iterdir()):
            if not file.is_file():
                continue
            try:
                with Image.open(file) as img:
                    img = img.convert(mode).resize((side, side), Image.BILINEAR)
                    array = np.asarray(img, dtype=np.float32) / 255.0
            except OSError:  # not an image
                continue
            images.append(torch.from_numpy(array.reshape(side, side, channels)).permute(2, 0, 1))
            labels.append(label)
    if len(images) < 2:
        raise SystemExit(f"fastcnn train: --data {path} holds fewer than 2 readable images")
    train, test = _split(torch.stack(images), torch.tensor(labels), test_fraction, seed)
    return train, test, classes


def _split(images: Tensor, labels: Tensor, test_fraction: float, seed: int) -> tuple[TensorDataset, TensorDataset]:
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(len(images) * test_fraction)))
    test_idx, train_idx = order[:n_test], order[n_test:]
    train = images[train_idx]
    mean = train.mean(dim=(0, 2, 3), keepdim=True)
    std = train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return (TensorDataset((train - mean) / std, labels[train_idx]),
            TensorDataset((images[test_idx] - mean) / std, labels[test_idx]))


# --- distributed ------------------------------------------------------------------------

@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_arg: str | None) -> tuple[Distributed, torch.device]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
        return Distributed(), device
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world_size, local_rank), device


# --- training ---------------------------------------------------------------------------

@dataclass
class Result:
    accuracy: float
    models: list[nn.Module]


def build_model(name: str, num_classes: int) -> nn.Module:
    from fastcnn import models

    kwargs = {"activation": "relu"} if name == "lenet5" else {}  # relu trains faster than the paper's tanh
    return models.get_model(name, num_classes=num_classes, **kwargs)


def _check_input_size(name: str, channels: int, side: int) -> None:
    """The model must take (channels, side, side) images: a forward pass on the meta
    device (no memory, no arithmetic) says so before any data is read."""
    with torch.device("meta"):
        probe = build_model(name, 10).eval()
        try:
            probe(torch.empty(1, channels, side, side))
        except (RuntimeError, ValueError) as error:
            raise SystemExit(f"fastcnn train: {name} cannot take {side}x{side} images (--image-size): "
                             f"{error}") from None


def load_pretrained(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """Loads a state_dict (or this command's checkpoint, whose "model" it is) into the
    model for transfer learning: every key must match the model's, with the same
    shape, except the head layers' (fastcnn.transfer.head_names), which keep their
    fresh initialisation where the checkpoint has another number of classes. Returns
    the keys left as initialised."""
    from fastcnn import transfer

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise SystemExit(f"fastcnn train --weights: cannot read {path}: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise SystemExit(f"fastcnn train --weights: {path} holds no state_dict")
    own = model.state_dict()
    head = tuple(f"{name}." for name in transfer.head_names(model))
    fresh = [k for k, v in state.items() if k in own and k.startswith(head) and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = [f"{k} {tuple(v.shape)} (model: {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and k not in fresh and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise SystemExit(f"fastcnn train --weights: {path} does not fit {type(model).__name__}: "
                         + "; ".join(f"{what}: {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                                     for what, keys in (("missing", missing), ("unexpected", unexpected),
                                                        ("other shape", wrong)) if keys))
    model.load_state_dict({k: v for k, v in state.items() if k not in fresh}, strict=False)
    return fresh


def run(args: argparse.Namespace) -> Result:
    """Trains as the parsed command line says; returns the test accuracy and the trained
    model(s) (unwrapped from DistributedDataParallel)."""
    dist_info, device = _init_distributed(args.device)
    try:
        return _run(args, dist_info, device)
    finally:
        if dist_info.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args, dist_info: Distributed, device: torch.device) -> Result:
    if args.ensemble < 1:
        raise SystemExit(f"fastcnn train: --ensemble must be at least 1, got {args.ensemble}")
    if args.epochs < 1:
        raise SystemExit(f"fastcnn train: --epochs must be at least 1, got {args.epochs}")
    from fastcnn import models
    if args.model not in models.list_models():
        raise SystemExit(f"fastcnn train: unknown --model {args.model!r}; known: {', '.join(models.list_models())}")
    channels, side = INPUT_SIZES.get(args.model, DEFAULT_INPUT)
    if args.image_size is not None:
        if args.image_size < 1:
            raise SystemExit(f"fastcnn train: --image-size must be positive, got {args.image_size}")
        side = args.image_size
    _check_input_size(args.model, channels, side)
    if args.data == "digits":
        train_set, test_set = load_digits(side, args.test_fraction, args.seed, channels)
        num_classes = 10
    else:
        train_set, test_set, classes = load_image_folder(args.data, channels, side, args.test_fraction, args.seed)
        num_classes = len(classes)
    out = Path(args.out)
    trained = []
    for member in range(args.ensemble):
        member_dir = out if args.ensemble == 1 else out / f"member_{member}"
        trained.append(_train_one(args, args.seed + member, member_dir, train_set, num_classes, dist_info, device,
                                  label="" if args.ensemble == 1 else f"model {member + 1}/{args.ensemble} "))
    accuracy = evaluate(trained, test_set, device, args.batch_size, ten_crop=args.ten_crop)
    if dist_info.main:
        print(f"test accuracy: {accuracy:.3f}", flush=True)
    return Result(accuracy, trained)


def _train_one(args, seed: int, out: Path, train_set, num_classes: int, dist_info: Distributed,
               device: torch.device, label: str) -> nn.Module:
    from fastcnn import transfer

    _seed_everything(seed)
    model = build_model(args.model, num_classes)
    if args.weights:
        load_pretrained(model, args.weights)
    model = model.to(device)
    if args.freeze:
        transfer.freeze(model, until=args.freeze)
    params = transfer.trainable_parameters(model)
    if args.optimizer == "adam":
        optimizer = torch.optim.Adam(params, lr=args.lr)
    else:
        optimizer = torch.optim.SGD(params, lr=args.lr, momentum=0.9)
    # Cosine decay of the learning rate to 0 over the run, stepped once per epoch; in closed
    # form, so that a run resumed with a larger --epochs continues along the longer curve.
    epochs = max(1, args.epochs)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: 0.5 * (1.0 + math.cos(math.pi * min(epoch, epochs) / epochs)))
    start = 0
    if args.resume:
        start = _load_last_checkpoint(out, model, optimizer, schedule)
    # Every process, distributed or not, takes its samples from a DistributedSampler with
    # the same seed: one process with batch 2B sees what two with batch B see together.
    sampler = DistributedSampler(train_set, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 shuffle=True, seed=seed)
    loader = DataLoader(train_set, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        pin_memory=device.type == "cuda")
    batches = PrefetchLoader(loader, device)
    wrapped = model
    if dist_info.world_size > 1:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    augment = _augmentation(train_set.tensors[0].shape[1:]) if args.augment else None
    show = dist_info.main and not args.no_progress
    progress = _progress(show)
    with progress:
        task = progress.add_task(f"{label}epoch", total=max(0, args.epochs - start) * len(batches))
        for epoch in range(start, args.epochs):
            sampler.set_epoch(epoch)
            wrapped.train()
            total, count = 0.0, 0
            for images, labels in batches:
                if augment is not None:
                    images = augment(images)
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(wrapped(images), labels)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(labels)
                count += len(labels)
                if show:
                    progress.update(task, advance=1,
                                    description=f"{label}epoch {epoch + 1}/{args.epochs} loss {total / count:.4f}")
            schedule.step()
            if dist_info.main:
                _save_checkpoint(out, epoch + 1, model, optimizer, schedule, args)
    return model


def _augmentation(image_shape):
    """The --augment transform for (C, H, W) images. Its draws come from torch's global
    generator, seeded by --seed and saved in the checkpoints, so --resume replays them."""
    try:
        from fastcnn.data import augment
    except ImportError as error:
        raise SystemExit(f"fastcnn train --augment needs fastcnn.data.augment: {error}") from None
    channels, height, width = image_shape
    steps = [augment.RandomCrop((height, width), padding=max(1, min(height, width) // 16)),
             augment.RandomRotation(10.0)]
    if channels == 3:  # digits and other grey images are not mirror-symmetric in general
        steps.append(augment.RandomMirror())
    return augment.Compose(steps)


def evaluate(trained: list[nn.Module], test_set: TensorDataset, device: torch.device, batch_size: int,
             ten_crop: bool = False) -> float:
    """Accuracy of one model, or of the average of several (fastcnn.inference.Ensemble),
    on the test set; with ten_crop, each image's prediction averages ten crops (the test
    images are first padded by 1/16 of their side, repeating their border, so that the
    crops have the size the model takes and the centre crop is the image itself)."""
    from fastcnn.inference import Ensemble, multi_crop

    model = trained[0] if len(trained) == 1 else Ensemble(trained)
    model.eval()
    correct = 0
    images_all, labels_all = test_set.tensors
    with torch.no_grad():
        for i in range(0, len(labels_all), batch_size):
            images = images_all[i:i + batch_size].to(device)
            labels = labels_all[i:i + batch_size].to(device)
            if ten_crop:
                side = images.shape[-1]
                margin = max(1, side // 16)
                padded = F.pad(images, (margin,) * 4, mode="replicate")
                # An ensemble already returns averaged probabilities: the crops average them as they are.
                scores = multi_crop(model, padded, crops=10, size=side,
                                    average="logits" if len(trained) > 1 else "probs")
            else:
                scores = model(images)
            correct += (scores.argmax(1) == labels).sum().item()
    return correct / len(labels_all)


# --- checkpoints ------------------------------------------------------------------------

def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    # numpy's key as a tensor: the checkpoint then loads with torch.load(weights_only=True).
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(out: Path, epoch: int, model: nn.Module, optimizer, schedule, args) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"epoch_{epoch:03d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "schedule": schedule.state_dict(), "epoch": epoch,
                "rng": _rng_state(), "args": vars(args)}, tmp)
    tmp.replace(path)  # a run killed mid-save leaves the previous checkpoint the last one


def last_checkpoint(out: Path) -> Path | None:
    """The checkpoint of the latest epoch in `out`, or None."""
    found = [(int(m.group(1)), p) for p in Path(out).glob("epoch_*.pt") if (m := CHECKPOINT.search(p.name))]
    return max(found)[1] if found else None


def _load_last_checkpoint(out: Path, model: nn.Module, optimizer, schedule) -> int:
    path = last_checkpoint(out)
    if path is None:
        raise SystemExit(f"fastcnn train --resume: no checkpoint (epoch_*.pt) in {out}")
    # On the CPU: the random generators' states must stay there (load_state_dict moves the rest).
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    # --epochs may differ from the saved run's: the learning rate follows the new curve.
    for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs, schedule.lr_lambdas):
        group["lr"] = base * factor(schedule.last_epoch)
    _set_rng_state(state["rng"])
    return state["epoch"]


def _progress(enabled: bool):
    if not enabled:
        return _Disabled()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())


class _Disabled:
    """Stands for a rich Progress when none is shown."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None

    def add_task(self, *args, **kwargs) -> None:
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastcnn train", description=__doc__)
    add_arguments(parser)
    run(parser.parse_args(sys.argv[1:] if argv is None else argv))
    return 0
