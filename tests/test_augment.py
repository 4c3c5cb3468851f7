"""fastcnn.data: each transform against a plain reference, seeding, per-sample use,
and the fused crop + mirror + colour kernel against the separate transforms."""

import numpy as np
import pytest
import torch

from conftest import DTYPES, assert_close
from fastcnn import backends
from fastcnn.data import (ColorShift, Compose, FusedAugment, LocalWarp, PCAColor, RandomCrop, RandomMirror,
                          RandomRotation, RandomShear, flip_crop_offset, rgb_pca)

ALL_DTYPES = [*DTYPES, torch.float64]
needs_triton = pytest.mark.skipif(backends.why_unavailable("triton", "cpu") is not None
                                  and not torch.cuda.is_available(), reason="triton cannot run here")


def images(shape=(4, 3, 7, 9), dtype=torch.float32, seed=0, layout="nchw"):
    gen = torch.Generator().manual_seed(seed)
    wide = [*shape[:-1], shape[-1] * 2] if layout == "strided" else shape
    x = torch.rand(wide, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x[..., ::2] if layout == "strided" else x


def pca_basis(seed=0):
    gen = torch.Generator().manual_seed(seed)
    eigvecs = torch.linalg.qr(torch.randn(3, 3, generator=gen, dtype=torch.float64))[0]
    return torch.tensor([0.5, 0.2, 0.05], dtype=torch.float64), eigvecs


def every_transform(seed):
    eigvals, eigvecs = pca_basis()
    return [RandomMirror(generator=seed), RandomCrop(5, padding=1, generator=seed), RandomRotation(20, generator=seed),
            RandomShear(15, generator=seed), LocalWarp(1.0, generator=seed), ColorShift(0.1, generator=seed),
            PCAColor(eigvals, eigvecs, generator=seed)]


# --- mirror and crop ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_mirror_twice_is_identity_and_flips_the_chosen_images(layout):
    x = images(layout=layout)
    mirror = RandomMirror(p=0.5, generator=3)
    params = mirror.sample(x.shape)
    once = mirror.apply(x, params)
    for i, flipped in enumerate(params["flip"].tolist()):
        assert torch.equal(once[i], x[i].flip(-1) if flipped else x[i])
    assert torch.equal(mirror.apply(once, params), x)
    assert torch.equal(RandomMirror(p=1.0)(RandomMirror(p=1.0)(x)), x)
    assert torch.equal(RandomMirror(p=0.0)(x), x)


@pytest.mark.parametrize("size,padding", [(5, 0), ((3, 9), 0), ((7, 9), 0), (4, 2), ((11, 13), 2), (1, 0)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_crop_lands_inside_and_equals_slicing(size, padding, layout):
    x = images((6, 3, 7, 9), layout=layout)
    crop = RandomCrop(size, padding=padding, generator=1)
    params = crop.sample(x.shape)
    h, w = crop.size
    assert (params["top"] >= 0).all() and (params["top"] + h <= 7 + 2 * padding).all()
    assert (params["left"] >= 0).all() and (params["left"] + w <= 9 + 2 * padding).all()
    out = crop.apply(x, params)
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    for i, (t, l) in enumerate(zip(params["top"].tolist(), params["left"].tolist())):
        assert torch.equal(out[i], padded[i, :, t:t + h, l:l + w])


def test_crop_offsets_cover_every_position():
    crop = RandomCrop(2, generator=0)
    params = crop.sample((400, 1, 4, 3))
    assert set(params["top"].tolist()) == {0, 1, 2} and set(params["left"].tolist()) == {0, 1}


# --- colour -----------------------------------------------------------------------------------------------------------

def test_rgb_pca_matches_numpy():
    x = images((5, 3, 6, 7), dtype=torch.float64)
    x[:, 1] += 0.7 * x[:, 0]  # correlated channels
    eigvals, eigvecs = rgb_pca(x)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    ref_vals, ref_vecs = np.linalg.eig(np.cov(pixels, rowvar=False))
    order = np.argsort(ref_vals)[::-1]
    np.testing.assert_allclose(eigvals.numpy(), ref_vals[order], rtol=1e-10)
    for i, j in enumerate(order):  # eigenvectors up to sign
        v, ref = eigvecs[:, i].numpy(), ref_vecs[:, j]
        np.testing.assert_allclose(v * np.sign(v @ ref), ref, atol=1e-10)
    # A loader of (images, labels) batches, a list of single images, a map-style Dataset
    # (no __iter__) of (image, label) pairs: same result.
    loader = [(x[:2], None), (x[2:], None)]
    dataset = torch.utils.data.TensorDataset(x, torch.arange(5))
    for source in (loader, list(x), dataset):
        vals, vecs = rgb_pca(source)
        torch.testing.assert_close(vals, eigvals)
        torch.testing.assert_close((vecs * eigvecs).sum(0).abs(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_pca_sigma_zero_is_identity(dtype):
    x = images(dtype=dtype)
    assert torch.equal(PCAColor(*pca_basis(), sigma=0.0, generator=0)(x), x)


def test_pca_offset_is_in_the_span_of_the_eigenvectors():
    eigvals, eigvecs = pca_basis()
    eigvals = torch.tensor([0.5, 0.2, 0.0], dtype=torch.float64)  # rank 2: the span is a plane
    pca = PCAColor(eigvals, eigvecs, sigma=1.0, generator=0)
    x = images((8, 3, 4, 5), dtype=torch.float64)
    params = pca.sample(x.shape)
    offset = params["offset"]
    assert offset.abs().max() > 1e-3
    assert (offset @ eigvecs[:, 2]).abs().max() < 1e-12  # no part along the zero-eigenvalue vector
    alpha = offset @ eigvecs / eigvals.clamp_min(1e-300)
    torch.testing.assert_close(offset, (alpha * eigvals) @ eigvecs.T)
    out = pca.apply(x, params)
    torch.testing.assert_close(out - x, offset[:, :, None, None].expand_as(x))


def test_color_shift_offsets_within_range_and_per_channel():
    x = images((50, 3, 2, 3), dtype=torch.float64) * 255
    shift = ColorShift(20.0, generator=0)
    params = shift.sample(x.shape)
    offset = params["offset"]
    assert offset.shape == (50, 3) and offset.abs().max() <= 20 and offset.abs().max() > 15
    assert offset.min() < 0 < offset.max()
    torch.testing.assert_close(shift.apply(x, params) - x, offset[:, :, None, None].expand_as(x))
    assert torch.equal(ColorShift(0.0)(x), x)


# --- geometry ---------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("transform", [RandomRotation(0), RandomRotation((0, 0)), RandomShear(0), LocalWarp(0.0)],
                         ids=["rotation", "rotation-pair", "shear", "warp"])
@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 1, 1, 1), (3, 1, 5, 2)])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_zero_strength_geometry_is_identity(transform, shape, dtype):
    x = images(shape, dtype=dtype)
    assert_close(transform(x), x, scale=4)


def test_rotation_by_90_degrees_on_a_square_is_rot90():
    x = images((2, 3, 6, 6), dtype=torch.float64)
    torch.testing.assert_close(RandomRotation((90, 90))(x), torch.rot90(x, 1, (-2, -1)))


def test_shear_moves_rows_by_tan_angle():
    # 45 degrees: row y (from the centre) moves by y pixels; on an odd height the
    # centre row stays and the rows one away move by exactly one pixel.
    x = images((1, 1, 3, 8), dtype=torch.float64)
    out = RandomShear((45, 45))(x)
    torch.testing.assert_close(out[0, 0, 1], x[0, 0, 1])
    torch.testing.assert_close(out[0, 0, 2, :-1], x[0, 0, 2, 1:])
    torch.testing.assert_close(out[0, 0, 0, 1:], x[0, 0, 0, :-1])


def test_warp_is_a_bounded_smooth_displacement():
    x = torch.arange(16, dtype=torch.float64).view(1, 1, 1, 16).expand(2, 1, 16, 16).contiguous()
    warp = LocalWarp(1.0, grid_size=3, generator=0)
    out = warp(x)
    inner = (out - x)[..., 3:-3, 3:-3]  # a horizontal ramp: value change = x displacement
    assert inner.abs().max() <= 1.0 + 1e-9 and inner.abs().max() > 0.05


# --- seeding, per-sample use, empty batches ---------------------------------------------------------------------------

@pytest.mark.parametrize("index", range(7))
def test_seeds_reproducible_and_different_seeds_differ(index):
    x = images((4, 3, 7, 9))
    a, b, c = (every_transform(seed)[index] for seed in (5, 5, 6))
    first = a(x)
    assert torch.equal(first, b(x))
    assert not torch.equal(first, c(x))
    assert not torch.equal(first, a(x))  # the generator moves on: the next batch differs
    gen = torch.Generator().manual_seed(5)
    same = type(a).__new__(type(a))
    same.__dict__.update(a.__dict__, _generator=gen)
    assert torch.equal(same(x), first)


def test_global_generator_follows_torch_manual_seed():
    x = images()
    torch.manual_seed(11)
    first = Compose(every_transform(None))(x)
    torch.manual_seed(11)
    assert torch.equal(Compose(every_transform(None))(x), first)


def test_per_sample_dataset_transform():
    data = images((5, 3, 8, 8))
    labels = torch.arange(5)

    class Dataset(torch.utils.data.Dataset):
        def __init__(self, transform):
            self.transform = transform

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            return self.transform(data[i]), labels[i]

    transform = Compose([RandomCrop(6, padding=1, generator=0), RandomMirror(generator=1), ColorShift(0.1, generator=2),
                         RandomRotation(10, generator=3)])
    batch, y = next(iter(torch.utils.data.DataLoader(Dataset(transform), batch_size=5)))
    assert batch.shape == (5, 3, 6, 6) and torch.equal(y, labels)
    # One image at a time equals a batch of one.
    again = Compose([RandomCrop(6, padding=1, generator=0), RandomMirror(generator=1), ColorShift(0.1, generator=2),
                     RandomRotation(10, generator=3)])
    for i in range(5):
        assert torch.equal(batch[i], again(data[i:i + 1])[0])


class _Shifted(torch.utils.data.Dataset):
    """One fixed image, colour-shifted by a transform with a private seed, per item."""

    def __init__(self, transform):
        self.transform, self.image = transform, torch.zeros(3, 2, 2)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.transform(self.image)


def test_seeded_transform_draws_differ_across_dataloader_workers():
    """Each worker has a copy of the private generator: its draws must not repeat the
    other worker's, and a loader seeded alike repeats the whole run."""
    def run(seed):
        loader = torch.utils.data.DataLoader(_Shifted(ColorShift(1.0, generator=0)), batch_size=1, num_workers=2,
                                             generator=torch.Generator().manual_seed(seed))
        return torch.cat(list(loader))

    first = run(3)
    offsets = first[:, :, 0, 0]  # one offset per image and channel
    assert len({tuple(row.tolist()) for row in offsets}) == len(offsets)
    assert torch.equal(run(3), first)
    assert not torch.equal(run(4), first)


@pytest.mark.parametrize("index", range(7))
def test_empty_batch(index):
    t = every_transform(0)[index]
    out = t(torch.empty(0, 3, 7, 9))
    assert out.shape == ((0, 3, 5, 5) if isinstance(t, RandomCrop) else (0, 3, 7, 9))


# --- fused ------------------------------------------------------------------------------------------------------------

def fused(seed=0, crop=True, mirror=True, color=True, pca=True, backend=None, size=(5, 6), padding=2):
    eigvals, eigvecs = pca_basis()
    return FusedAugment(RandomCrop(size, padding=padding, generator=seed) if crop else None,
                        RandomMirror(generator=seed + 1) if mirror else None,
                        ColorShift(0.2, generator=seed + 2) if color else None,
                        PCAColor(eigvals, eigvecs, generator=seed + 3) if pca else None, backend=backend)


FUSED_BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def steps_id(steps):
    return "".join(n for n, on in zip(("crop", "mirror", "color", "pca"), steps) if on) or "none"


@pytest.mark.parametrize("steps", [(1, 1, 1, 1), (1, 0, 0, 0), (0, 1, 0, 0), (0, 0, 1, 1), (1, 1, 0, 0), (0, 0, 0, 0)],
                         ids=steps_id)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_equals_separate_transforms(backend, steps):
    x = images((5, 3, 7, 9))
    f = fused(backend=backend, crop=steps[0], mirror=steps[1], color=steps[2], pca=steps[3])
    params = f.sample(x.shape)
    assert_close(f.apply(x, params), f.apply_separately(x, params))
    # Same seeds, Compose of the separate transforms: the same batch.
    assert_close(fused(backend=backend, crop=steps[0], mirror=steps[1], color=steps[2], pca=steps[3])(x),
                 fused(crop=steps[0], mirror=steps[1], color=steps[2], pca=steps[3]).separate()(x))


@needs_triton
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("shape,size,padding", [((4, 3, 7, 9), (5, 6), 2), ((2, 3, 1, 1), (1, 1), 0),
                                                ((3, 3, 5, 2), (9, 6), 2), ((1, 3, 13, 11), (13, 11), 0)])
def test_fused_triton_is_bit_exact_with_torch_path(dtype, layout, shape, size, padding):
    x = images(shape, dtype=dtype, layout=layout)
    x[0, 0, 0, 0] = float("nan")  # NaN stays in its (moved) pixel
    f = fused(size=size, padding=padding, pca=shape[1] == 3)
    params = f.sample(x.shape)
    f.backend = "torch"
    expected = f.apply(x, params)
    f.backend = "triton"
    actual = f.apply(x, params)
    assert actual.shape == expected.shape == (shape[0], shape[1], *size)
    for fmt in (torch.contiguous_format, torch.channels_last):
        assert actual.is_contiguous(memory_format=fmt) == expected.is_contiguous(memory_format=fmt)
    assert actual.is_contiguous(memory_format=torch.channels_last if layout == "channels_last" else
                                torch.contiguous_format)
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual.nan_to_num(), expected.nan_to_num())
    assert_close(expected, f.apply_separately(x, params), equal_nan=True, scale=4)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_fused_empty_batch_and_single_image(backend):
    assert fused(backend=backend)(torch.empty(0, 3, 7, 9)).shape == (0, 3, 5, 6)
    x = images((1, 3, 7, 9))
    assert torch.equal(fused(backend=backend)(x[0]), fused(backend=backend)(x)[0])


def _op_args(x, size=(5, 6), padding=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n, c, hi, wi = x.shape
    top = torch.randint(0, hi + 2 * padding - size[0] + 1, (n,), generator=gen)
    left = torch.randint(0, wi + 2 * padding - size[1] + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    offset = torch.randn(n, c, generator=gen, dtype=torch.float64).float()
    return x, list(size), top, left, flip, offset, padding


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_flip_crop_offset_is_a_library_op(backend):
    """fastcnn::flip_crop_offset: schema, fake (output strides as the real one's) and
    the torch.compile path, through torch.library.opcheck."""
    for layout in ("nchw", "channels_last"):
        args = (*_op_args(images((3, 3, 7, 9), layout=layout)), backend)
        torch.library.opcheck(torch.ops.fastcnn.flip_crop_offset.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend, device", [
    ("torch", "cpu"),
    pytest.param("triton", "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
])
def test_flip_crop_offset_compiles_fullgraph(backend, device):
    """On CUDA the compiled graph takes the Triton twin, whose launch must go through
    wrap_triton (a direct launch asks the traced tensors for data pointers)."""
    x, size, top, left, flip, offset, padding = (a.to(device) if isinstance(a, torch.Tensor) else a
                                                 for a in _op_args(images((2, 3, 7, 9))))

    def step(x, top, left, flip, offset):
        return flip_crop_offset(x, size, top, left, flip, offset, padding, backend=backend) * 2

    compiled = torch.compile(step, fullgraph=True)
    assert torch.equal(compiled(x, top, left, flip, offset), step(x, top, left, flip, offset))


def test_images_that_require_grad_are_refused():
    x, size, top, left, flip, offset, padding = _op_args(images((2, 3, 7, 9)).requires_grad_())
    with pytest.raises(ValueError, match="images must not require grad"):
        flip_crop_offset(x, size, top, left, flip, offset, padding)
    with torch.no_grad():
        assert flip_crop_offset(x, size, top, left, flip, offset, padding).shape == (2, 3, 5, 6)


# --- bad arguments ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,exc,match", [
    (lambda: RandomMirror(p=1.5), ValueError, "p"),
    (lambda: RandomMirror(p="a"), TypeError, "p"),
    (lambda: RandomCrop(0), ValueError, "size"),
    (lambda: RandomCrop(2.5), TypeError, "size"),
    (lambda: RandomCrop(2, padding=-1), ValueError, "padding"),
    (lambda: RandomRotation(-3), ValueError, "degrees"),
    (lambda: RandomRotation((5, 1)), ValueError, "degrees"),
    (lambda: RandomShear(90), ValueError, "degrees"),
    (lambda: LocalWarp(-1.0), ValueError, "strength"),
    (lambda: LocalWarp(1.0, grid_size=1), ValueError, "grid_size"),
    (lambda: ColorShift(float("nan")), ValueError, "delta"),
    (lambda: PCAColor(torch.ones(2), torch.eye(3)), ValueError, "eigvals"),
    (lambda: PCAColor(torch.ones(3), torch.eye(2)), ValueError, "eigvecs"),
    (lambda: PCAColor(*pca_basis(), sigma=-1.0), ValueError, "sigma"),
    (lambda: RandomMirror(generator="seed"), TypeError, "generator"),
    (lambda: Compose([1]), TypeError, r"transforms\[0\]"),
    (lambda: FusedAugment(crop=RandomMirror()), TypeError, "crop"),
    (lambda: FusedAugment(backend="cuda"), ValueError, "backend"),
])
def test_bad_constructor_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_bad_images():
    with pytest.raises(TypeError, match="images"):
        RandomMirror()(torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="images"):
        RandomMirror()(torch.zeros(3, 4))
    with pytest.raises(TypeError, match="images"):
        RandomMirror()([1.0])
    with pytest.raises(ValueError, match="size"):
        RandomCrop(8)(torch.zeros(1, 3, 7, 9))
    with pytest.raises(ValueError, match="channels"):
        PCAColor(*pca_basis())(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="images_or_loader"):
        rgb_pca(torch.zeros(1, 4, 2, 2))
    with pytest.raises(ValueError, match="images_or_loader"):
        rgb_pca([])
    with pytest.raises(TypeError, match="images_or_loader"):
        rgb_pca(3)
    x = torch.zeros(2, 3, 4, 4)
    z = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match="top and left"):
        flip_crop_offset(x, (3, 3), z + 2, z, z.bool(), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="offset"):
        flip_crop_offset(x, (3, 3), z, z, z.bool(), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="flip"):
        flip_crop_offset(x, (3, 3), z, z, torch.zeros(3, dtype=torch.bool), torch.zeros(2, 3))
