"""Batched, seeded data augmentation on (N, C, H, W) float tensors.

Every transform works on the device the batch lives on. Its random parameters
(one set per image) are drawn on a CPU generator and then moved, so a seed gives
the same batch on every device. A transform is split in two:

- `sample(shape)`: the per-image parameters for a batch of that shape (CPU tensors);
- `apply(images, params)`: the deterministic transform given those parameters.

Calling a transform does both. It also takes a single (C, H, W) image, so it can
serve as a `torch.utils.data.Dataset` transform.

Seeding: `generator` is a `torch.Generator`, an int seed (a private generator
seeded with it) or None (torch's global CPU generator: seeded by
`torch.manual_seed`, and reseeded per DataLoader worker). Inside a DataLoader
worker a private generator, which every worker gets a copy of, is replaced by
one seeded from it and the worker's seed, so workers do not repeat each other's
draws and a seeded loader (torch.manual_seed, or its `generator=`) repeats its run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BatchTransform", "ColorShift", "Compose", "LocalWarp", "PCAColor", "RandomCrop", "RandomMirror",
           "RandomRotation", "RandomShear", "rgb_pca"]

Params = dict[str, Tensor]


def make_generator(generator: torch.Generator | int | None) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {type(generator).__name__}")


def check_images(images) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a tensor, got {type(images).__name__}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor, got {images.dtype}")
    if images.dim() not in (3, 4):
        raise ValueError(f"images must be (N, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def _range(degrees, name: str) -> tuple[float, float]:
    """A number d means (-d, d); a pair (lo, hi) is taken as is."""
    if isinstance(degrees, (tuple, list)):
        if len(degrees) != 2:
            raise ValueError(f"{name} must be a number or a (low, high) pair, got {degrees!r}")
        lo, hi = (_number(d, name) for d in degrees)
        if lo > hi:
            raise ValueError(f"{name} must have low <= high, got {degrees!r}")
        return lo, hi
    d = _number(degrees, name)
    if d < 0:
        raise ValueError(f"{name} must be >= 0 when a single number, got {degrees}")
    return -d, d


def _uniform(n: int, lo: float, hi: float, generator, dtype=torch.float64) -> Tensor:
    return torch.rand(n, generator=generator, dtype=dtype) * (hi - lo) + lo


def sample_and_apply(transform, images: Tensor) -> Tensor:
    """transform.apply(images, transform.sample(shape)) on a batch, or on one (C, H, W)
    image as a batch of one."""
    check_images(images)
    single = images.dim() == 3
    batch = images.unsqueeze(0) if single else images
    out = transform.apply(batch, transform.sample(batch.shape))
    return out.squeeze(0) if single else out


class BatchTransform:
    """Base class: a seeded transform of a batch (or of one image)."""

    def __init__(self, generator: torch.Generator | int | None = None):
        self._generator = make_generator(generator)
        self._worker_generator: tuple[int, int, torch.Generator] | None = None

    @property
    def generator(self) -> torch.Generator | None:
        """The generator draws come from. In a DataLoader worker a private generator (each
        worker has a copy of it, in the same state) would repeat the other workers' draws:
        there it is replaced, once per worker, by one seeded from a draw of the copy and
        the worker's seed (which torch derives from the loader's base seed, fresh per
        epoch without persistent workers, and the worker id)."""
        worker = torch.utils.data.get_worker_info()
        if self._generator is None or worker is None:
            return self._generator
        if self._worker_generator is None or self._worker_generator[:2] != (worker.id, worker.seed):
            draw = int(torch.randint(0, 2**62, (1,), generator=self._generator))
            seed = (draw ^ worker.seed) & (2**63 - 1)
            self._worker_generator = (worker.id, worker.seed, torch.Generator().manual_seed(seed))
        return self._worker_generator[2]

    def sample(self, shape: Sequence[int]) -> Params:
        raise NotImplementedError

    def apply(self, images: Tensor, params: Params) -> Tensor:
        raise NotImplementedError

    def __call__(self, images: Tensor) -> Tensor:
        return sample_and_apply(self, images)


class Compose:
    """Applies transforms in order; any callables on a batch (or an image) will do."""

    def __init__(self, transforms: Iterable[Callable[[Tensor], Tensor]]):
        self.transforms = list(transforms)
        for i, t in enumerate(self.transforms):
            if not callable(t):
                raise TypeError(f"transforms[{i}] must be callable, got {type(t).__name__}")

    def __call__(self, images: Tensor) -> Tensor:
        for t in self.transforms:
            images = t(images)
        return images


class RandomMirror(BatchTransform):
    """Flips each image horizontally with probability p."""

    def __init__(self, p: float = 0.5, generator: torch.Generator | int | None = None):
        super().__init__(generator)
        self.p = _number(p, "p")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")

    def sample(self, shape):
        return {"flip": torch.rand(shape[0], generator=self.generator) < self.p}

    def apply(self, images, params):
        flip = params["flip"].to(images.device).view(-1, 1, 1, 1)
        return torch.where(flip, images.flip(-1), images)


class RandomCrop(BatchTransform):
    """Crops a size (h, w) window at a random offset of the image zero-padded by
    `padding` on every side; the window always lies inside the padded image.
    Offsets are in padded coordinates: row `top` of the padded image is row
    `top - padding` of the original."""

    def __init__(self, size: int | tuple[int, int], padding: int = 0, generator: torch.Generator | int | None = None):
        super().__init__(generator)
        if isinstance(size, int) and not isinstance(size, bool):
            size = (size, size)
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) for s in size)):
            raise TypeError(f"size must be an int or a pair of ints, got {size!r}")
        if min(size) < 1:
            raise ValueError(f"size must be positive, got {tuple(size)}")
        if isinstance(padding, bool) or not isinstance(padding, int):
            raise TypeError(f"padding must be an int, got {type(padding).__name__}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.size = (int(size[0]), int(size[1]))
        self.padding = padding

    def _check_fits(self, shape) -> None:
        h, w = shape[-2] + 2 * self.padding, shape[-1] + 2 * self.padding
        if self.size[0] > h or self.size[1] > w:
            raise ValueError(f"size {self.size} does not fit in the padded image ({h}, {w})")

    def sample(self, shape):
        self._check_fits(shape)
        n = shape[0]
        top = torch.randint(0, shape[-2] + 2 * self.padding - self.size[0] + 1, (n,), generator=self.generator)
        left = torch.randint(0, shape[-1] + 2 * self.padding - self.size[1] + 1, (n,), generator=self.generator)
        return {"top": top, "left": left}

    def apply(self, images, params):
        self._check_fits(images.shape)
        p = self.padding
        padded = F.pad(images, (p, p, p, p)) if p else images
        n, c, hp, wp = padded.shape
        h, w = self.size
        rows = params["top"].to(images.device).view(n, 1) + torch.arange(h, device=images.device)
        cols = params["left"].to(images.device).view(n, 1) + torch.arange(w, device=images.device)
        out = padded.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, wp))
        return out.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def _sample_grid(images: Tensor, grid: Tensor) -> Tensor:
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="zeros", align_corners=False)


def _affine(images: Tensor, theta: Tensor) -> Tensor:
    """theta: (N, 2, 3) in grid_sample's normalised coordinates (float64, CPU)."""
    if images.numel() == 0:  # affine_grid rejects empty sizes
        return images.clone()
    grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
    return _sample_grid(images, grid)


class RandomRotation(BatchTransform):
    """Rotates each image about its centre by an angle drawn uniformly from
    `degrees` (d means (-d, d)), counter-clockwise as displayed (row 0 at the
    top) for positive angles; what rotates in from outside the image is zero."""

    def __init__(self, degrees, generator: torch.Generator | int | None = None):
        super().__init__(generator)
        self.degrees = _range(degrees, "degrees")

    def sample(self, shape):
        return {"angle": _uniform(shape[0], *self.degrees, self.generator)}

    def apply(self, images, params):
        h, w = images.shape[-2:]
        a = torch.deg2rad(params["angle"].double().cpu())
        cos, sin = torch.cos(a), torch.sin(a)
        theta = torch.zeros(len(a), 2, 3, dtype=torch.float64)
        # A rotation in pixels, written in coordinates normalised by (w/2, h/2).
        theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
        theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
        return _affine(images, theta)


class RandomShear(BatchTransform):
    """Shears each image horizontally about its centre by an angle drawn uniformly
    from `degrees`: the content of row y (counted down from the centre) shifts left
    by tan(angle) * y pixels."""

    def __init__(self, degrees, generator: torch.Generator | int | None = None):
        super().__init__(generator)
        self.degrees = _range(degrees, "degrees")
        if max(abs(d) for d in self.degrees) >= 90:
            raise ValueError(f"degrees must lie within (-90, 90), got {degrees!r}")

    def sample(self, shape):
        return {"angle": _uniform(shape[0], *self.degrees, self.generator)}

    def apply(self, images, params):
        h, w = images.shape[-2:]
        theta = torch.zeros(images.shape[0], 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        theta[:, 0, 1] = torch.tan(torch.deg2rad(params["angle"].double().cpu())) * h / w
        return _affine(images, theta)


class LocalWarp(BatchTransform):
    """A smooth random displacement of every pixel: a coarse grid (grid_size x
    grid_size) of displacements, uniform in [-strength, strength] pixels per axis,
    upsampled bicubically to the image and applied with grid_sample."""

    def __init__(self, strength: float, grid_size: int = 4, generator: torch.Generator | int | None = None):
        super().__init__(generator)
        self.strength = _number(strength, "strength")
        if self.strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}")
        if isinstance(grid_size, bool) or not isinstance(grid_size, int):
            raise TypeError(f"grid_size must be an int, got {type(grid_size).__name__}")
        if grid_size < 2:
            raise ValueError(f"grid_size must be >= 2, got {grid_size}")
        self.grid_size = grid_size

    def sample(self, shape):
        g = self.grid_size
        coarse = torch.rand(shape[0], 2, g, g, generator=self.generator, dtype=torch.float64) * 2 - 1
        return {"displacement": coarse * self.strength}

    def apply(self, images, params):
        n, _, h, w = images.shape
        if images.numel() == 0:  # affine_grid rejects empty sizes
            return images.clone()
        identity = torch.eye(2, 3, dtype=torch.float64).expand(n, 2, 3)
        grid = F.affine_grid(identity, [n, 1, h, w], align_corners=False)
        # Pixels to normalised units: x spans 2 over w pixels, y over h.
        field = F.interpolate(params["displacement"].double(), size=(h, w), mode="bicubic", align_corners=True)
        field = field * torch.tensor([2.0 / w, 2.0 / h], dtype=torch.float64).view(1, 2, 1, 1)
        grid = grid + field.permute(0, 2, 3, 1)
        return _sample_grid(images, grid.to(images.device))


class ColorShift(BatchTransform):
    """Adds to each channel of each image an offset uniform in [-delta, delta]
    (delta in the images' units: 20 for 0..255 images shifts as R+20, G-20, ...)."""

    def __init__(self, delta: float, generator: torch.Generator | int | None = None):
        super().__init__(generator)
        self.delta = _number(delta, "delta")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta}")

    def sample(self, shape):
        n, c = shape[0], shape[1]
        return {"offset": (torch.rand(n, c, generator=self.generator, dtype=torch.float64) * 2 - 1) * self.delta}

    def apply(self, images, params):
        return images + params["offset"].to(images.device, images.dtype)[:, :, None, None]


def _batches(images_or_loader) -> Iterable[Tensor]:
    if isinstance(images_or_loader, Tensor):
        yield images_or_loader
        return
    if not isinstance(images_or_loader, Iterable):
        if not (hasattr(images_or_loader, "__getitem__") and hasattr(images_or_loader, "__len__")):
            raise TypeError("images_or_loader must be a tensor, an iterable or a map-style Dataset of tensors (or of "
                            f"(images, ...) tuples), got {type(images_or_loader).__name__}")
        # a map-style Dataset (torch's define __getitem__ and __len__, not __iter__): item by item
        dataset = images_or_loader
        images_or_loader = (dataset[i] for i in range(len(dataset)))
    for item in images_or_loader:
        yield item[0] if isinstance(item, (tuple, list)) else item


def rgb_pca(images_or_loader) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the 3x3 covariance of RGB pixel values over a data set.

    images_or_loader: an (N, 3, H, W) or (3, H, W) tensor, or an iterable (a
    DataLoader, a Dataset, a list) of such tensors or of (images, label, ...) tuples.
    Returns (eigvals (3,), eigvecs (3, 3)) in float64, largest eigenvalue first;
    eigvecs[:, i] is the eigenvector of eigvals[i].
    """
    count = 0
    total = torch.zeros(3, dtype=torch.float64)
    outer = torch.zeros(3, 3, dtype=torch.float64)
    for batch in _batches(images_or_loader):
        if not isinstance(batch, Tensor) or not batch.is_floating_point() or batch.dim() not in (3, 4):
            raise TypeError("images_or_loader must hold floating-point (N, 3, H, W) or (3, H, W) tensors")
        if batch.shape[-3] != 3:
            raise ValueError(f"images_or_loader must hold RGB images (3 channels), got {batch.shape[-3]}")
        pixels = batch.detach().double().movedim(-3, -1).reshape(-1, 3)
        count += pixels.shape[0]
        total += pixels.sum(0).cpu()
        outer += (pixels.T @ pixels).cpu()
    if count < 2:
        raise ValueError(f"images_or_loader must hold at least 2 pixels, got {count}")
    mean = total / count
    cov = (outer - count * torch.outer(mean, mean)) / (count - 1)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    return eigvals.flip(0).clamp_min(0), eigvecs.flip(1)


class PCAColor(BatchTransform):
    """AlexNet's colour augmentation: adds to every pixel of an image
    sum_i alpha_i * eigvals[i] * eigvecs[:, i], alpha_i ~ N(0, sigma) drawn per
    image. eigvals, eigvecs as `rgb_pca` returns them; sigma = 0 is the identity."""

    def __init__(self, eigvals: Tensor, eigvecs: Tensor, sigma: float = 0.1,
                 generator: torch.Generator | int | None = None):
        super().__init__(generator)
        if not isinstance(eigvals, Tensor) or eigvals.shape != (3,):
            raise ValueError(f"eigvals must be a tensor of shape (3,), got {getattr(eigvals, 'shape', eigvals)}")
        if not isinstance(eigvecs, Tensor) or eigvecs.shape != (3, 3):
            raise ValueError(f"eigvecs must be a tensor of shape (3, 3), got {getattr(eigvecs, 'shape', eigvecs)}")
        self.eigvals = eigvals.detach().double().cpu()
        self.eigvecs = eigvecs.detach().double().cpu()
        self.sigma = _number(sigma, "sigma")
        if self.sigma < 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")

    def sample(self, shape):
        if shape[1] != 3:
            raise ValueError(f"images must have 3 (RGB) channels for PCAColor, got {shape[1]}")
        alpha = torch.randn(shape[0], 3, generator=self.generator, dtype=torch.float64) * self.sigma
        return {"offset": (alpha * self.eigvals) @ self.eigvecs.T}

    def apply(self, images, params):
        if images.shape[1] != 3:
            raise ValueError(f"images must have 3 (RGB) channels for PCAColor, got {images.shape[1]}")
        return images + params["offset"].to(images.device, images.dtype)[:, :, None, None]
