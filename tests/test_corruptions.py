"""CIFAR-C corruptions: determinism per image, invariants of each corruption, the cache and the official reader.

Expected values come from the corruptions' definitions (HSV value shift, contrast about the mean, a pixel
disk, a clamped one-sided blur, convex resampling), not from the generator's own output.
"""
from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from ipsd.data import DataError, load_dataset
from ipsd.evaluation import corruptions as C
from ipsd.evaluation.corruptions import CORRUPTIONS, CorruptionDataError, corrupt, load_or_make, read_official

RANDOMISED = ("glass_blur", "motion_blur", "snow", "frost", "fog", "elastic_transform")
FIXED = ("defocus_blur", "gaussian_blur", "brightness", "contrast")


def images(n: int = 4, seed: int = 0, lo: int = 0, hi: int = 256) -> np.ndarray:
    """Random uint8 NHWC images with values in [lo, hi)."""
    return np.random.default_rng(seed).integers(lo, hi, (n, 32, 32, 3), dtype=np.uint8)


def hf_energy(x: np.ndarray) -> float:
    """Mean squared difference of horizontally and vertically adjacent pixels."""
    x = x.astype(np.float64)
    return float(((x[:, 1:] - x[:, :-1]) ** 2).mean() + ((x[:, :, 1:] - x[:, :, :-1]) ** 2).mean())


def test_the_ten_cifar_c_names():
    assert sorted(CORRUPTIONS) == sorted([
        "defocus_blur", "glass_blur", "motion_blur", "gaussian_blur", "snow", "frost", "fog",
        "brightness", "contrast", "elastic_transform"])


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_uint8_same_shape_and_deterministic(name):
    x = images(3)
    for s in range(1, 6):
        a = corrupt(x, name, s, [5, 9, 2])
        assert a.dtype == np.uint8 and a.shape == x.shape
        np.testing.assert_array_equal(a, corrupt(x.copy(), name, s, [5, 9, 2]))
    assert not np.array_equal(corrupt(x, name, 5), x)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_an_image_alone_equals_it_in_a_batch(name):
    x = images(4, seed=1)
    idx = [7, 3, 11, 5]
    batch = corrupt(x, name, 3, idx)
    np.testing.assert_array_equal(corrupt(x[2:3], name, 3, [11])[0], batch[2])
    order = [3, 1, 0, 2]
    np.testing.assert_array_equal(corrupt(x[order], name, 3, [idx[i] for i in order]), batch[order])


def test_chunking_does_not_change_the_result(monkeypatch):
    x = images(5, seed=5)
    whole = {name: corrupt(x, name, 2) for name in RANDOMISED}
    monkeypatch.setattr(C, "CHUNK", 2)
    for name in RANDOMISED:
        np.testing.assert_array_equal(corrupt(x, name, 2), whole[name])


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_randomness_follows_the_image_index(name):
    x = np.repeat(images(1, seed=2), 2, axis=0)
    out = corrupt(x, name, 4, [0, 1])
    assert np.array_equal(out[0], out[1]) == (name in FIXED)


def test_input_checks():
    x = images(2)
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt(x, "zoom", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(x, "fog", 6)
    with pytest.raises(ValueError, match="one index per image"):
        corrupt(x, "fog", 1, [0])
    with pytest.raises(ValueError, match="uint8"):
        corrupt(x.astype(np.float32), "fog", 1)
    t = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    with pytest.raises(TypeError, match="to_nhwc"):
        corrupt(t, "fog", 1)
    np.testing.assert_array_equal(C.to_nhwc(t), x)
    assert issubclass(CorruptionDataError, DataError)


# ------------------------------------------------------------------------------------- per corruption

def test_brightness_adds_to_hsv_value():
    # grey pixels have saturation 0: value v/255 -> min(v/255 + c, 1)
    grey = np.array([0, 50, 100, 200, 250], dtype=np.uint8)
    x = np.repeat(grey[:, None, None, None], 32, 1).repeat(32, 2).repeat(3, 3)
    shifts = [0.05, 0.1, 0.15, 0.2, 0.3]
    for s, c in enumerate(shifts, start=1):
        out = corrupt(x, "brightness", s)[:, 0, 0, 0].astype(float)
        want = np.floor(np.minimum(grey / 255 + c, 1) * 255)
        assert np.abs(out - want).max() <= 1, (s, out, want)
    # a coloured pixel keeps hue and saturation: all channels scale by V'/V
    px = np.full((1, 32, 32, 3), (200, 100, 50), dtype=np.uint8)
    for s, c in ((2, 0.1), (5, 0.3)):  # V' = 225.5/255, and V' capped at 1
        out = corrupt(px, "brightness", s)[0, 0, 0].astype(float)
        np.testing.assert_allclose(out, np.array([200, 100, 50]) * min(200 / 255 + c, 1) / (200 / 255), atol=1.01)
    means = [corrupt(images(4), "brightness", s).mean() for s in range(1, 6)]
    assert np.all(np.diff(means) > 0) and means[0] > images(4).mean()


def test_contrast_scales_deviations_from_the_channel_mean():
    x = images(4, lo=40, hi=216)  # no clipping at any factor
    sd_in, mean_in = x.std(axis=(1, 2)), x.mean(axis=(1, 2))
    factors = [0.75, 0.5, 0.4, 0.3, 0.15]
    for s, c in enumerate(factors, start=1):
        out = corrupt(x, "contrast", s)
        np.testing.assert_allclose(out.std(axis=(1, 2)), c * sd_in, atol=0.6)
        np.testing.assert_allclose(out.mean(axis=(1, 2)), mean_in, atol=1.0)


def test_gaussian_and_defocus_blur_lose_high_frequencies_with_severity():
    x = images(4)
    for name in ("gaussian_blur", "defocus_blur"):
        energy = [hf_energy(corrupt(x, name, s)) for s in range(1, 6)]
        assert energy[0] < hf_energy(x) and np.all(np.diff(energy) < 0), (name, energy)


def test_glass_and_motion_blur_lose_high_frequencies():
    x = images(8)
    for name in ("glass_blur", "motion_blur"):
        energy = [hf_energy(corrupt(x, name, s)) for s in range(1, 6)]
        assert energy[4] < energy[0] < hf_energy(x), (name, energy)


def test_gaussian_blur_of_a_point():
    # sigma 1 (severity 5) over rows and columns only, kernel cut at 4 sigma: weights e^{-i^2/2} / S
    x = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    x[0, 16, 16] = 255
    s = sum(math.exp(-i * i / 2) for i in range(-4, 5))
    out = corrupt(x, "gaussian_blur", 5)[0].astype(float)
    assert abs(out[16, 16, 0] - 255 / s ** 2) <= 1
    assert abs(out[16, 17, 1] - 255 * math.exp(-0.5) / s ** 2) <= 1
    assert abs(out[17, 17, 2] - 255 * math.exp(-1.0) / s ** 2) <= 1
    assert out[16, 21].max() == 0  # 5 pixels away is past the 4-sigma cut


def test_defocus_blur_of_a_point_is_the_pixel_disk():
    x = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    x[0, 16, 16] = 255
    # radius 1: the centre and its 4 neighbours (alias blur 0.2 leaks ~1e-5); radius 1.5: the 3x3 square
    out4 = corrupt(x, "defocus_blur", 4)[0, :, :, 0].astype(float)
    cross = [(16, 16), (15, 16), (17, 16), (16, 15), (16, 17)]
    assert all(abs(out4[p] - 255 / 5) <= 1 for p in cross)
    assert out4[15, 15] == 0 and out4.sum() == pytest.approx(255, abs=6)
    out5 = corrupt(x, "defocus_blur", 5)[0, :, :, 0].astype(float)
    assert np.all(np.abs(out5[15:18, 15:18] - 255 / 9) <= 1) and out5[14, 16] == 0


def test_glass_blur_severity1_copies_each_pixel_from_up_left_neighbours():
    # sigma 0.05 leaves pixels as they are, so one pass is visible: pixel (h, w), 2 <= h, w <= 31, takes
    # the value at (h+dy, w+dx) with dx, dy in {-1, 0}; rows and columns 0-1 stay
    x = images(2, seed=3)
    out = corrupt(x, "glass_blur", 1)
    np.testing.assert_array_equal(out[:, :2], x[:, :2])
    np.testing.assert_array_equal(out[:, :, :2], x[:, :, :2])
    moved = 0
    for n in range(2):
        for h in range(2, 32):
            for w in range(2, 32):
                sources = [tuple(x[n, h + dy, w + dx]) for dy in (-1, 0) for dx in (-1, 0)]
                assert tuple(out[n, h, w]) in sources
                moved += tuple(out[n, h, w]) != tuple(x[n, h, w])
    assert moved > 0.5 * 2 * 30 * 30  # 3 of 4 offsets move the pixel


def test_motion_taps_follow_imagemagick():
    weights, drow, dcol = C.motion_taps(6, 2.0, np.array([0.0, 90.0, 45.0]))
    assert weights.shape == (13,)  # 2 * ceil(6) + 1
    np.testing.assert_allclose(weights, np.exp(-np.arange(13) ** 2 / 8) / np.exp(-np.arange(13) ** 2 / 8).sum())
    np.testing.assert_array_equal(dcol[0], np.arange(13))
    np.testing.assert_array_equal(drow[0], 0)
    np.testing.assert_array_equal(drow[1], np.arange(13))
    np.testing.assert_array_equal(dcol[1], 0)
    np.testing.assert_array_equal(drow[2], dcol[2])
    assert drow[2][-1] == round(12 / math.sqrt(2))


def test_motion_blur_keeps_what_is_constant_along_the_motion():
    rng = np.random.default_rng(4)
    rows_const = np.repeat(rng.uniform(0, 255, (1, 32, 1, 3)), 32, axis=2)  # every row one colour
    np.testing.assert_allclose(C.motion_blur_batch(rows_const, 9, 2.5, np.array([0.0])), rows_const, atol=1e-9)
    cols_const = rows_const.transpose(0, 2, 1, 3)
    np.testing.assert_allclose(C.motion_blur_batch(cols_const, 9, 2.5, np.array([90.0])), cols_const, atol=1e-9)
    # a column ramp at 0 degrees: interior pixels move by the weights' mean offset
    ramp = np.broadcast_to(np.arange(32.0)[None, None, :, None], (1, 32, 32, 1))
    w = np.exp(-np.arange(13) ** 2 / 2.0)
    out = C.motion_blur_batch(ramp, 6, 1.0, np.array([0.0]))
    np.testing.assert_allclose(out[0, 5, :19, 0], np.arange(19) + (np.arange(13) * w).sum() / w.sum())


def test_snow_only_brightens():
    x = images(4)
    for s in range(1, 6):
        out = corrupt(x, "snow", s)
        assert (out.astype(int) >= x.astype(int) - 1).all()
        assert out.mean() > x.mean() + 5


def test_frost_blends_image_and_a_frost_layer():
    x = images(4)
    for s, (keep, amount) in enumerate([(1, 0.2), (1, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45)], start=1):
        out = corrupt(x, "frost", s).astype(float)
        assert (out >= np.floor(keep * x)).all()
        assert (out <= np.minimum(255, keep * x + amount * 255)).all()


def test_frost_layer_texture_is_like_the_reference_photographs():
    # the reference's frost crops (photographs resized 0.2x, 32x32) have channel means 66-212, within-crop
    # std 12-35 and neighbour correlation 0.22-0.53: textured, not smooth
    layers = np.stack([C.frost_layer(np.random.default_rng(i)) for i in range(60)]).astype(float)
    assert layers.dtype == float and layers.shape == (60, 32, 32, 3)
    means = layers.mean(axis=(1, 2))
    assert means.min() > 30 and means.max() < 240
    assert 8 < layers.std(axis=(1, 2)).mean() < 40
    lum = layers.mean(-1) - layers.mean(-1).mean(axis=(1, 2), keepdims=True)
    rho1 = (lum[:, 1:] * lum[:, :-1]).mean() / (lum ** 2).mean()
    assert 0.15 < rho1 < 0.65


def test_fog_never_exceeds_the_image_peak():
    x = images(4, hi=200)
    for s in range(1, 6):
        out = corrupt(x, "fog", s)
        assert (out.max(axis=(1, 2, 3)) <= x.max(axis=(1, 2, 3))).all()


def test_plasma_fractal_spans_zero_to_one_and_smooths_with_decay():
    maps = {d: [C.plasma_fractal(np.random.default_rng(i), 32, d) for i in range(20)] for d in (1.75, 3.0)}
    for m in maps[1.75] + maps[3.0]:
        assert m.shape == (32, 32) and m.min() == 0 and m.max() == 1
    rough = {d: np.mean([((m[1:] - m[:-1]) ** 2).mean() for m in ms]) for d, ms in maps.items()}
    assert rough[3.0] < rough[1.75]  # faster decay: less fine-scale noise


def test_warp_affine_moves_points_by_the_map():
    src = np.array([[26.0, 26.0], [26.0, 6.0], [6.0, 6.0]])  # (x, y)
    img = np.zeros((32, 32, 2), dtype=np.float32)
    img[10, 5] = 1.0  # x = 5, y = 10
    shifted = C.warp_affine(img, src, src + [3.0, 0.0])  # 3 pixels along x (columns)
    np.testing.assert_array_equal(np.argwhere(shifted[..., 1] > 0.5), [[10, 8]])
    sheared = C.warp_affine(img, src, np.c_[src[:, 0], src[:, 1] + 0.4 * src[:, 0]])  # y' = y + 0.4 x
    np.testing.assert_array_equal(np.argwhere(sheared[..., 0] > 0.5), [[12, 5]])
    half = C.warp_affine(img, src, src + [0.5, 0.0])  # half a pixel: bilinear weights 1/2, 1/2
    np.testing.assert_allclose(half[10, 5:7, 0], [0.5, 0.5])


def test_elastic_transform_resamples_within_the_input_range():
    x = images(4, lo=30, hi=220)
    for s in range(1, 6):
        out = corrupt(x, "elastic_transform", s).astype(int)
        assert (out.min(axis=(1, 2)) >= x.min(axis=(1, 2)) - 1).all()
        assert (out.max(axis=(1, 2)) <= x.max(axis=(1, 2))).all()
    flat = np.full((1, 32, 32, 3), 123, dtype=np.uint8)
    assert np.abs(corrupt(flat, "elastic_transform", 5).astype(int) - 123).max() <= 1


# ------------------------------------------------------------------------------------------------ cache

def test_cache_writes_once_and_verifies(tmp_path, monkeypatch):
    x = images(4)
    out = load_or_make(tmp_path, "cifar10", "contrast", 2, x)
    np.testing.assert_array_equal(out, corrupt(x, "contrast", 2))
    folder = tmp_path / "cifar10-c-generated"
    path = folder / "contrast-2.npy"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"]["contrast-2.npy"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".lock")) == [
        "contrast-2.npy", "manifest.json"]  # no temporary files left

    def fail(*a, **k):
        raise AssertionError("regenerated a cached file")
    monkeypatch.setattr(C, "corrupt", fail)
    np.testing.assert_array_equal(load_or_make(tmp_path, "cifar10", "contrast", 2, x), out)


def test_cache_refuses_a_damaged_file(tmp_path):
    x = images(4)
    load_or_make(tmp_path, "cifar10", "fog", 1, x)
    path = tmp_path / "cifar10-c-generated" / "fog-1.npy"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptionDataError, match=r"fog-1\.npy.*sha256.*delete"):
        load_or_make(tmp_path, "cifar10", "fog", 1, x)
    path.unlink()  # the fix the message names
    np.testing.assert_array_equal(load_or_make(tmp_path, "cifar10", "fog", 1, x), corrupt(x, "fog", 1))


def test_cache_refuses_other_clean_images_and_unlisted_files(tmp_path):
    load_or_make(tmp_path, "cifar10", "brightness", 3, images(4))
    with pytest.raises(CorruptionDataError, match="other clean images"):
        load_or_make(tmp_path, "cifar10", "brightness", 3, images(4, seed=9))
    stray = tmp_path / "cifar10-c-generated" / "brightness-4.npy"
    np.save(stray, images(4))
    with pytest.raises(CorruptionDataError, match=r"brightness-4\.npy has no checksum.*delete"):
        load_or_make(tmp_path, "cifar10", "brightness", 4, images(4))


# ---------------------------------------------------------------------------------------- official files

def write_official(root, name="fog", per=4, rows=None):
    folder = root / "CIFAR-10-C"
    folder.mkdir(exist_ok=True)
    n = 5 * per if rows is None else rows
    x = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, 32, 32, 3)).copy()
    np.save(folder / f"{name}.npy", x)
    np.save(folder / "labels.npy", (np.arange(5 * per) % 10).astype(np.uint8))
    return folder


def test_official_reader_takes_the_severity_rows(tmp_path):
    write_official(tmp_path, per=4)
    imgs, labels = read_official(tmp_path, "cifar10", "fog", 3, per_severity=4)
    assert imgs.shape == (4, 32, 32, 3) and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs[:, 0, 0, 0], [8, 9, 10, 11])  # rows (3-1)*4 .. 3*4
    np.testing.assert_array_equal(labels, [8, 9, 0, 1])
    assert labels.dtype == np.int64


def test_official_reader_refuses_a_wrong_shape_or_checksum(tmp_path):
    folder = write_official(tmp_path, per=4, rows=19)
    with pytest.raises(CorruptionDataError, match=r"fog\.npy has uint8 \(19, 32, 32, 3\), expected uint8 \(20"):
        read_official(tmp_path, "cifar10", "fog", 1, per_severity=4)
    write_official(tmp_path, per=4)
    (folder / "SHA256SUMS").write_text("0" * 64 + "  fog.npy\n")
    with pytest.raises(CorruptionDataError, match=r"fog\.npy does not match its sha256"):
        read_official(tmp_path, "cifar10", "fog", 1, per_severity=4)
    digest = hashlib.sha256((folder / "fog.npy").read_bytes()).hexdigest()
    (folder / "SHA256SUMS").write_text(f"{digest}  fog.npy\n")
    assert read_official(tmp_path, "cifar10", "fog", 1, per_severity=4)[0].shape == (4, 32, 32, 3)
    (folder / "labels.npy").unlink()
    with pytest.raises(CorruptionDataError, match=r"labels\.npy is missing"):
        read_official(tmp_path, "cifar10", "fog", 1, per_severity=4)


def test_load_or_make_prefers_official_files(tmp_path):
    write_official(tmp_path, name="snow", per=4)
    x = images(4)
    out = load_or_make(tmp_path, "cifar10", "snow", 5, x)
    np.testing.assert_array_equal(out[:, 0, 0, 0], [16, 17, 18, 19])
    assert not (tmp_path / "cifar10-c-generated").exists()
    np.testing.assert_array_equal(load_or_make(tmp_path, "cifar10", "snow", 5, x, prefer_official=False),
                                  corrupt(x, "snow", 5))
    with pytest.raises(CorruptionDataError, match=r"snow\.npy has uint8 \(20, 32, 32, 3\), expected uint8 \(15"):
        load_or_make(tmp_path, "cifar10", "snow", 5, x[:3])  # 3 clean images cannot match 4 per severity


# ------------------------------------------------------------------------------------------- real data

def test_on_real_cifar10_images(cifar10_root):
    x = C.to_nhwc(load_dataset("cifar10", str(cifar10_root), False).test_x[:64])
    brightness = [corrupt(x, "brightness", s).mean() for s in range(1, 6)]
    contrast = [corrupt(x, "contrast", s).astype(float).std(axis=(1, 2)).mean() for s in range(1, 6)]
    assert np.all(np.diff(brightness) > 0) and np.all(np.diff(contrast) < 0)
    for name in ("gaussian_blur", "defocus_blur"):
        energy = [hf_energy(corrupt(x, name, s)) for s in range(1, 6)]
        assert np.all(np.diff(energy) < 0), (name, energy)
    for name in CORRUPTIONS:
        assert np.abs(corrupt(x, name, 5).astype(int) - x).mean() > 1.0, name
