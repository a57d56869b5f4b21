"""Batched on-device RandAugment + Cutout (VRM's virtual view): every op against PIL (the library the CRLD
pipeline runs), per-sample randomness, determinism, the Cutout size distribution and speed."""
import math
import statistics
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from ipsd.data.randaugment import OP, OPS, apply_ops, op_values, rand_augment
from ipsd.models import build_model


def natural_images(k: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Smooth colour fields plus noise: varied histograms, no constant channels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(k, 3, 6, 6, generator=g), size=size, mode="bilinear",
                                        align_corners=False)
    return (x * 200 + torch.rand(k, 3, size, size, generator=g) * 55).clamp(0, 255).to(torch.uint8)


def to_pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def from_pil(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)


# CRLD's op definitions (scx-822/CRLD-main mdistiller/dataset/cifar100.py), written against PIL
PIL_OPS = {
    "AutoContrast": lambda im, v: ImageOps.autocontrast(im),
    "Brightness": lambda im, v: ImageEnhance.Brightness(im).enhance(v),
    "Color": lambda im, v: ImageEnhance.Color(im).enhance(v),
    "Contrast": lambda im, v: ImageEnhance.Contrast(im).enhance(v),
    "Equalize": lambda im, v: ImageOps.equalize(im),
    "Identity": lambda im, v: im,
    "Posterize": lambda im, v: ImageOps.posterize(im, int(v)),
    "Rotate": lambda im, v: im.rotate(v),
    "Sharpness": lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
    "ShearX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, v, 0, 0, 1, 0)),
    "ShearY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, v, 1, 0)),
    "Solarize": lambda im, v: ImageOps.solarize(im, v),
    "TranslateX": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, v * im.size[0], 0, 1, 0)),
    "TranslateY": lambda im, v: im.transform(im.size, Image.AFFINE, (1, 0, 0, 0, 1, v * im.size[1])),
}
# the ends of CRLD's ranges plus values inside (and one enhancement > 1, torchvision's side)
VALUES = {
    "Brightness": [0.05, 0.5, 0.95, 1.27], "Color": [0.05, 0.5, 0.95, 1.27], "Contrast": [0.05, 0.5, 0.95, 1.27],
    "Sharpness": [0.05, 0.5, 0.95, 1.27], "Posterize": [4, 5, 6, 7], "Rotate": [-30, -7.3, 12.9, 30],
    "ShearX": [-0.3, -0.11, 0.17, 0.3], "ShearY": [-0.3, -0.11, 0.17, 0.3], "Solarize": [0, 77.5, 128, 256],
    "TranslateX": [-0.3, -0.13, 0.071, 0.3], "TranslateY": [-0.3, -0.13, 0.071, 0.3],
}


@pytest.mark.parametrize("name", OPS)
def test_each_op_matches_pil(name):
    x = natural_images(4, seed=OP[name])
    values = VALUES.get(name, [0.0] * 4)
    ours = apply_ops(x.float(), torch.full((4,), OP[name]), torch.tensor(values)).to(torch.uint8)
    ref = torch.stack([from_pil(PIL_OPS[name](to_pil(x[i]), values[i])) for i in range(4)])
    diff = (ours.int() - ref.int()).abs()
    assert (diff > 0).float().mean() <= 0.005, name  # identical up to rare float ties
    if name not in ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"):
        assert diff.max() <= 1, name
    if name != "Identity":
        assert not torch.equal(ours, x), f"{name} changed nothing"


def test_subset_and_where_schedules_agree():
    x = natural_images(64).float()
    g = torch.Generator().manual_seed(3)
    ops = torch.randint(len(OPS), (64,), generator=g)
    vals = op_values(ops[:, None], torch.rand(64, 1, generator=g), torch.rand(64, 1, generator=g) < 0.5, 10,
                     "fixmatch", 32)[:, 0]
    assert torch.equal(apply_ops(x, ops, vals, subset=True), apply_ops(x, ops, vals, subset=False))


def test_shape_dtype_and_input_untouched():
    x = natural_images(8)
    keep = x.clone()
    y = rand_augment(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == torch.uint8 and y.device == x.device
    assert torch.equal(x, keep)
    with pytest.raises(ValueError, match="uint8"):
        rand_augment(x.float(), torch.Generator())
    with pytest.raises(ValueError, match="magnitude"):
        rand_augment(x, torch.Generator(), magnitude=11)


def test_deterministic_per_seed():
    x = natural_images(32)
    a = rand_augment(x, torch.Generator().manual_seed(5))
    b = rand_augment(x, torch.Generator().manual_seed(5))
    c = rand_augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_every_sample_draws_its_own_ops():
    """One image repeated: with n=1 and no Cutout each copy shows one op; the parameter-free ops each occur
    for about 1/14 of the copies, and hundreds of distinct outputs appear."""
    b = 1400
    x = natural_images(1, seed=9).expand(b, -1, -1, -1).contiguous()
    y = rand_augment(x, torch.Generator().manual_seed(0), n=1, cutout=0.0)
    exact = {"Identity": x[0], "AutoContrast": from_pil(ImageOps.autocontrast(to_pil(x[0]))),
             "Equalize": from_pil(ImageOps.equalize(to_pil(x[0])))}
    for name, target in exact.items():
        share = (y == target).flatten(1).all(1).float().mean().item()
        assert abs(share - 1 / 14) < 0.03, (name, share)
    distinct = len({bytes(v.numpy()) for v in y})
    assert distinct > 0.4 * b  # parameter-free ops, 4 posterize levels and integer shifts repeat


def test_two_ops_compose():
    """n=2: outputs are compositions, so some differ from every single-op result of the same draws."""
    x = natural_images(256)
    one = rand_augment(x, torch.Generator().manual_seed(1), n=1, cutout=0.0)
    two = rand_augment(x, torch.Generator().manual_seed(1), n=2, cutout=0.0)
    assert (one != two).flatten(1).any(1).float().mean() > 0.5


def test_fixmatch_values_cover_crld_ranges():
    b = 20000
    g = torch.Generator().manual_seed(0)
    ops = torch.randint(len(OPS), (b, 1), generator=g)
    vals = op_values(ops, torch.rand(b, 1, generator=g), torch.rand(b, 1, generator=g) < 0.5, 10, "fixmatch", 32)
    ranges = {"Brightness": (0.05, 0.95), "Rotate": (-30, 30), "ShearX": (-0.3, 0.3), "TranslateY": (-0.3, 0.3),
              "Solarize": (0, 256), "Posterize": (4, 7)}
    for name, (lo, hi) in ranges.items():
        v = vals[ops == OP[name]]
        assert v.min() >= lo - 1e-6 and v.max() <= hi + 1e-6, name
        assert v.min() < lo + 0.05 * (hi - lo) and v.max() > hi - 0.05 * (hi - lo), name
    assert set(vals[ops == OP["Posterize"]].tolist()) == {4.0, 5.0, 6.0, 7.0}
    half = op_values(ops, torch.ones(b, 1), torch.ones(b, 1, dtype=torch.bool), 5, "fixmatch", 32)
    assert torch.allclose(half[ops == OP["Rotate"]], torch.tensor(15.0))  # 0 + (30 - 0) * 5/10
    assert torch.allclose(half[ops == OP["Contrast"]], torch.tensor(0.975))  # 1 + (0.95 - 1) * 5/10


def test_torchvision_variant_magnitudes():
    """torchvision RandAugment(magnitude=9) of 31 bins, by hand: shear 0.09, rotate 9 deg, translate
    int(150/331*32*0.3) = 4 px, enhance 1 +- 0.27, posterize 8 - round(1.2) = 7 bits, solarize 178.5."""
    ops = torch.tensor([[OP[n]] for n in ("ShearX", "Rotate", "TranslateX", "Color", "Posterize", "Solarize")] * 2)
    sign = torch.tensor([[False]] * 6 + [[True]] * 6)
    v = op_values(ops, torch.rand(12, 1), sign, 9, "torchvision", 32)[:, 0]
    plus = torch.tensor([0.09, 9.0, 4 / 32, 1.27, 7.0, 178.5])
    minus = torch.tensor([-0.09, -9.0, -4 / 32, 0.73, 7.0, 178.5])
    torch.testing.assert_close(v, torch.cat([plus, minus]))


def pil_cutout_area(rng: np.random.Generator, size: int = 32) -> int:
    """CRLD's Cutout(img, U(0, 0.5)) on a black image with PIL, area in pixels (centre uniform on the image)."""
    v = rng.uniform() * 0.5
    if v <= 0:
        return 0
    s = v * size
    x0, y0 = int(max(0, rng.uniform(0, size) - s / 2)), int(max(0, rng.uniform(0, size) - s / 2))
    im = Image.new("RGB", (size, size))
    ImageDraw.Draw(im).rectangle((x0, y0, min(size, x0 + s), min(size, y0 + s)), (125, 123, 114))
    return int((np.asarray(im)[:, :, 0] > 0).sum())


def test_cutout_area_distribution():
    b = 3000
    x = torch.zeros(b, 3, 32, 32, dtype=torch.uint8)
    y = rand_augment(x, torch.Generator().manual_seed(0), n=0, cutout=0.5)
    hit = (y != 0).any(1)
    assert torch.equal(y.permute(0, 2, 3, 1)[hit], torch.tensor([125, 123, 114], dtype=torch.uint8).expand(int(hit.sum()), 3))
    rows, cols = hit.any(2), hit.any(1)
    area = hit.sum((1, 2))
    assert torch.equal(area, rows.sum(1) * cols.sum(1))  # a filled axis-aligned rectangle
    assert rows.sum(1).max() <= 17 and cols.sum(1).max() <= 17  # side <= 0.5 * 32 (inclusive edge: +1)
    rng = np.random.default_rng(0)
    ref = np.sort([pil_cutout_area(rng) for _ in range(b)])
    ours = np.sort(area.numpy())
    grid = np.arange(0, 290)
    ks = np.abs(np.searchsorted(ours, grid, side="right") - np.searchsorted(ref, grid, side="right")).max() / b
    assert ks < 0.05, ks
    assert abs(ours.mean() - ref.mean()) < 4 * ref.std() / math.sqrt(b)
    assert torch.equal(rand_augment(x[:8], torch.Generator().manual_seed(0), n=0, cutout=0.0), x[:8])


def test_batch_of_128_is_fast_relative_to_a_training_step():
    torch.manual_seed(0)
    x = natural_images(128)
    g = torch.Generator().manual_seed(0)
    rand_augment(x, g)
    ra = []
    for _ in range(5):
        t = time.perf_counter()
        rand_augment(x, g)
        ra.append(time.perf_counter() - t)
    model = build_model("resnet8", 100)
    xf = x.float() / 255
    step = []
    for _ in range(3):
        t = time.perf_counter()
        model(xf).logsumexp(1).mean().backward()
        step.append(time.perf_counter() - t)
    ra_ms, step_ms = 1000 * statistics.median(ra), 1000 * statistics.median(step)
    print(f"rand_augment B=128: {ra_ms:.1f} ms; resnet8 fwd+bwd B=128: {step_ms:.1f} ms")
    assert ra_ms < 0.5 * step_ms


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_draws():
    x = natural_images(64)
    g = torch.Generator().manual_seed(2)
    ops = torch.randint(len(OPS), (64,), generator=g)
    vals = op_values(ops[:, None], torch.rand(64, 1, generator=g), torch.rand(64, 1, generator=g) < 0.5, 10,
                     "fixmatch", 32)[:, 0]
    cpu = apply_ops(x.float(), ops, vals)
    gpu = apply_ops(x.float().cuda(), ops.cuda(), vals.cuda()).cpu()
    assert (cpu != gpu).float().mean() < 0.002
    y = rand_augment(x.cuda(), torch.Generator("cuda").manual_seed(0))
    assert y.device.type == "cuda" and y.dtype == torch.uint8


def test_loader_builds_the_strong_view_with_it():
    """DeviceLoader with Needs(views=2, strong_view2=True): view2 = normalise(rand_augment(crop+flip)), a
    different image grid than x (RandAugment + Cutout), still on the uint8 lattice after un-normalising."""
    from helpers import toy_data

    from ipsd.data.loader import DeviceLoader
    from ipsd.data.batch import Needs

    loader = DeviceLoader(toy_data(), torch.device("cpu"), 16, Needs(views=2, strong_view2=True), seed=0)
    batch = next(iter(loader.epoch(1)))
    assert batch.view2.shape == batch.x.shape
    u8 = (batch.view2 - loader.shift) / loader.scale
    assert torch.allclose(u8, u8.round(), atol=1e-3) and u8.min() >= -1e-3 and u8.max() <= 255 + 1e-3
    assert (batch.view2 != batch.x).flatten(1).any(1).all()
    again = next(iter(loader.epoch(1)))
    assert torch.equal(again.view2, batch.view2)  # the loader's per-epoch generator drives it
