"""CIFAR-C corruptions at severities 1-5: a generator, its checksummed cache, and a reader of the official files.

The ten corruptions and their per-severity constants are Hendrycks & Dietterich's CIFAR-specific ones
(the 32x32 parameters of their CIFAR-10-C/CIFAR-100-C generator, not the ImageNet-C ones). Images are
numpy uint8 ``(N, 32, 32, 3)`` (NHWC, RGB), the layout of the official ``.npy`` files; :func:`to_nhwc`
converts the ``(N, 3, 32, 32)`` tensors of :class:`ipsd.data.ImageData`.

Each image's randomness comes from its own generator, seeded by a hash of (corruption, severity, image
index), so an image's output never depends on the other images in the batch. Float results are cast to
uint8 by truncation, as the reference generator's final ``np.uint8`` cast does (motion blur and snow's
blurred layer are rounded, as the ImageMagick round trip in the reference rounds them).

Differences from the reference generator, which needs ImageMagick and six frost photographs:

* motion_blur and snow's streaks: ImageMagick's motion blur re-implemented with numpy (same one-sided
  tap layout, Gaussian tap weights, kernel width ``2*ceil(radius)+1``, rounding of tap offsets and
  edge-clamped borders); ImageMagick's 16-bit internal quantum is not modelled.
* frost: a procedural ice-crystal layer instead of a crop of a photograph. Small branched crystals
  (a stem with side branches at +-60 degrees) are drawn on a 160x160 canvas and sampled every 5th pixel,
  as the reference samples its photographs (a 0.2x bilinear resize, then a 32x32 crop); a smooth field
  adds the photographs' slow tone changes. Each image draws one of five tint profiles, one per
  photograph the reference draws from (frost1-frost5; frost6 is never drawn there), whose crop mean,
  crop-to-crop spread, within-crop spread, smooth-variance share and crystal polarity were measured on
  those photographs resized and cropped the reference's way. The blend weights are the reference's.
* random numbers come from numpy's PCG64 generators, so no image equals its official counterpart
  pixel for pixel; apart from frost, the random draws follow the reference's distributions.
* elastic_transform's affine warp is scipy's bilinear resampling, where the reference uses OpenCV's
  ``warpAffine`` (which rounds sample positions to 1/32 pixel).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from scipy import ndimage

from ipsd.data.datasets import DataError

CORRUPTIONS: tuple[str, ...] = (
    "defocus_blur", "glass_blur", "motion_blur", "gaussian_blur", "snow",
    "frost", "fog", "brightness", "contrast", "elastic_transform",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
IMAGE_SIZE = 32
# Bumped whenever a corruption's output changes; a cache made by another version is refused.
GENERATOR_VERSION = 1
CHUNK = 1000  # images corrupted at a time

OFFICIAL_DIRS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
OFFICIAL_PER_SEVERITY = 10_000  # rows per severity in an official <name>.npy (the CIFAR test set)
OFFICIAL_CHECKSUMS = "SHA256SUMS"  # optional, in the official folder, in `sha256sum` output format

# Per-severity constants of the CIFAR generator (make_cifar_c.py in Hendrycks' `robustness` repository).
GAUSSIAN_BLUR = (0.4, 0.6, 0.7, 0.8, 1.0)                      # sigma
GLASS_BLUR = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, max delta, passes
DEFOCUS_BLUR = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))   # disk radius, alias sigma
MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))               # radius, sigma
MOTION_ANGLE = (-45.0, 45.0)                                                   # degrees, uniform
# snow: layer mean, layer std, zoom, threshold, blur radius, blur sigma, image weight
SNOW = ((0.1, 0.2, 1.0, 0.6, 8, 3, 0.95),
        (0.1, 0.2, 1.0, 0.5, 10, 4, 0.9),
        (0.15, 0.3, 1.75, 0.55, 10, 4, 0.9),
        (0.25, 0.3, 2.25, 0.6, 12, 6, 0.85),
        (0.3, 0.3, 1.25, 0.65, 14, 12, 0.8))
SNOW_ANGLE = (-135.0, -45.0)
FROST = ((1.0, 0.2), (1.0, 0.3), (0.9, 0.4), (0.85, 0.4), (0.75, 0.45))  # image weight, frost weight
FOG = ((0.2, 3.0), (0.5, 3.0), (0.75, 2.5), (1.0, 2.0), (1.5, 1.75))      # strength, fractal decay
BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)   # added to HSV value
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)     # factor on deviations from the per-channel mean
# elastic: displacement scale, displacement smoothing sigma, affine corner jitter (pixels, = 32 x fraction)
ELASTIC = tuple((IMAGE_SIZE * a, IMAGE_SIZE * s, IMAGE_SIZE * f) for a, s, f in (
    (0.0, 0.0, 0.08), (0.05, 0.2, 0.07), (0.08, 0.06, 0.06), (0.1, 0.04, 0.05), (0.1, 0.03, 0.03)))

# Frost tint profiles, measured on the reference's frost1-frost5 resized 0.2x and cut into 32x32 crops:
# crop mean RGB, spread of crop means RGB, within-crop std RGB, share of the luminance variance in
# the smooth field, and crystal polarity (+1 bright needles, -1 dark gaps between bright ice).
FROST_PROFILES = (
    ((77.8, 148.5, 164.9), (17.1, 9.4, 7.6), (21.5, 13.1, 12.5), 0.45, +1.0),   # frost1 (blue-green ice)
    ((198.0, 202.3, 211.6), (7.9, 8.6, 9.2), (17.9, 18.2, 18.8), 0.25, -1.0),   # frost2 (white rime)
    ((198.0, 202.3, 211.6), (7.9, 8.6, 9.2), (17.9, 18.2, 18.8), 0.25, -1.0),   # frost3 (= frost2)
    ((143.7, 158.4, 171.2), (10.1, 9.9, 10.7), (25.7, 25.7, 26.9), 0.18, -1.0),  # frost4 (grey fronds)
    ((103.2, 114.6, 126.4), (17.4, 16.7, 15.8), (34.6, 34.2, 33.6), 0.12, +1.0),  # frost5 (dark, dense)
)
FROST_CANVAS_SCALE = 5        # canvas pixels per output pixel (the reference's 0.2x resize)
FROST_NEEDLES = 300           # mean number of crystal stems on the 160x160 canvas
FROST_STEM_LENGTH = (4.0, 16.0)  # canvas pixels, uniform
FROST_SMOOTH_SIGMA = 5.0      # output pixels


class CorruptionDataError(DataError):
    """A corrupted-test-set file is missing, malformed or fails its checksum; the message names the fix."""


# ----------------------------------------------------------------------------------------------- helpers

def image_seed(name: str, severity: int, index: int) -> int:
    """The 64-bit seed of one image's generator: a SHA-256 hash of (corruption, severity, image index)."""
    digest = hashlib.sha256(f"ipsd-cifar-c|{name}|{int(severity)}|{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _generators(name: str, severity: int, indices: np.ndarray) -> list[np.random.Generator]:
    return [np.random.Generator(np.random.PCG64(image_seed(name, severity, i))) for i in indices]


def to_nhwc(images) -> np.ndarray:
    """uint8 NHWC numpy array from a uint8 ``(N, 3, H, W)`` torch tensor or numpy array."""
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"expected (N, 3, H, W) images, got shape {arr.shape}")
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))


def _truncate_u8(x: np.ndarray) -> np.ndarray:
    """[0, 255] floats to uint8 by truncation, as the reference's np.uint8 cast."""
    return np.clip(x, 0, 255).astype(np.uint8)


def _gaussian(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """Gaussian blur of a batch (N, H, W, C) over H and W only (scikit-image's default mode and truncation)."""
    return ndimage.gaussian_filter(x, sigma=(0, sigma, sigma, 0), mode=mode, truncate=truncate)


def motion_taps(radius: float, sigma: float, angles_deg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ImageMagick's motion-blur taps: weights (K,) and per-angle row and column offsets (N, K).

    K = 2*ceil(radius) + 1 taps trail on one side of the pixel; tap i has weight exp(-i^2 / (2 sigma^2))
    (normalised) and sits i pixels along the angle (0 degrees = +column, 90 = +row), each offset
    rounded half down.
    """
    k = np.arange(int(2 * np.ceil(radius) + 1), dtype=np.float64)
    weights = np.exp(-k ** 2 / (2.0 * sigma ** 2))
    weights /= weights.sum()
    theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))[:, None]
    drow = np.ceil(k * np.sin(theta) - 0.5).astype(np.int64)
    dcol = np.ceil(k * np.cos(theta) - 0.5).astype(np.int64)
    return weights, drow, dcol


def motion_blur_batch(x: np.ndarray, radius: float, sigma: float, angles_deg: np.ndarray) -> np.ndarray:
    """One-sided Gaussian motion blur of a float batch (N, H, W, C), one angle per image, borders clamped."""
    n, h, w = x.shape[:3]
    weights, drow, dcol = motion_taps(radius, sigma, angles_deg)
    rows, cols = np.arange(h), np.arange(w)
    batch = np.arange(n)[:, None, None]
    out = np.zeros(x.shape, dtype=np.float64)
    for t, wt in enumerate(weights):
        r = np.clip(rows[None, :] + drow[:, t:t + 1], 0, h - 1)
        c = np.clip(cols[None, :] + dcol[:, t:t + 1], 0, w - 1)
        out += wt * x[batch, r[:, :, None], c[:, None, :]]
    return out


def _centre_zoom(layer: np.ndarray, factor: float) -> np.ndarray:
    """Zoom a square 2-D array about its centre by ``factor`` (bilinear), cropped back to its size."""
    if factor == 1:
        return layer
    h = layer.shape[0]
    crop = int(np.ceil(h / factor))
    top = (h - crop) // 2
    zoomed = ndimage.zoom(layer[top:top + crop, top:top + crop], factor, order=1)
    trim = (zoomed.shape[0] - h) // 2
    return zoomed[trim:trim + h, trim:trim + h]


def plasma_fractals(unit_noise: np.ndarray, size: int = IMAGE_SIZE, decay: float = 3.0) -> np.ndarray:
    """Diamond-square height maps on a torus, (N, size, size), each rescaled to [0, 1].

    Each new point is the mean of its four neighbours at the current half-step plus noise uniform in
    (-a^2, a^2); a starts at 100 and is divided by ``decay`` per level (the reference's fog fractal).
    ``unit_noise`` (N, size*size - 1), uniform in (-1, 1), supplies the noise in the order the points
    are set: per level the square centres, then the midpoints of horizontal edges, then of vertical ones.
    """
    if size & (size - 1):
        raise ValueError(f"plasma size must be a power of two, got {size}")
    n = unit_noise.shape[0]
    hmap = np.zeros((n, size, size))
    step, amp, used = size, 100.0, 0

    def put(rows, cols, value):
        nonlocal used
        count = rows.size * cols.size
        noise = unit_noise[:, used:used + count].reshape(n, rows.size, cols.size)
        hmap[:, rows[:, None], cols[None, :]] = value / 4 + amp * amp * noise
        used += count

    while step >= 2:
        half = step // 2
        on, off = np.arange(0, size, step), np.arange(half, size, step)
        lo, hi = (off - half) % size, (off + half) % size  # the corners either side of a centre
        # square centres: mean of the four corners
        put(off, off, hmap[:, lo[:, None], lo[None, :]] + hmap[:, lo[:, None], hi[None, :]]
            + hmap[:, hi[:, None], lo[None, :]] + hmap[:, hi[:, None], hi[None, :]])
        # edge midpoints: mean of the two corners and the two centres at distance half
        for rows, cols in ((on, off), (off, on)):
            put(rows, cols, hmap[:, rows[:, None], ((cols - half) % size)[None, :]]
                + hmap[:, rows[:, None], ((cols + half) % size)[None, :]]
                + hmap[:, ((rows - half) % size)[:, None], cols[None, :]]
                + hmap[:, ((rows + half) % size)[:, None], cols[None, :]])
        step //= 2
        amp /= decay
    hmap -= hmap.min(axis=(1, 2), keepdims=True)
    return hmap / hmap.max(axis=(1, 2), keepdims=True)


def plasma_fractal(rng: np.random.Generator, size: int = IMAGE_SIZE, decay: float = 3.0) -> np.ndarray:
    """One (size, size) fog fractal, its noise drawn from ``rng``."""
    return plasma_fractals(rng.uniform(-1, 1, (1, size * size - 1)), size, decay)[0]


def _standardise(a: np.ndarray) -> np.ndarray:
    s = a.std()
    return (a - a.mean()) / s if s > 0 else np.zeros_like(a)


def ice_crystals(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Density of small branched ice crystals sampled on a ``size`` x ``size`` grid, in [0, 1).

    Stems (uniform position and direction, length uniform in FROST_STEM_LENGTH) carry side branches at
    +-60 degrees every 4 canvas pixels, shorter towards the tip; the strokes are drawn on a torus of
    ``size * FROST_CANVAS_SCALE`` pixels, blurred to ~1.5 pixel wide lines, saturated and read every
    FROST_CANVAS_SCALE-th pixel.
    """
    scale = FROST_CANVAS_SCALE
    canvas_size = size * scale
    n_stems = max(1, rng.poisson(FROST_NEEDLES))
    x0 = rng.uniform(0, canvas_size, n_stems)
    y0 = rng.uniform(0, canvas_size, n_stems)
    theta = rng.uniform(0, np.pi * 2, n_stems)
    length = rng.uniform(*FROST_STEM_LENGTH, n_stems)
    seg_x, seg_y, seg_t, seg_l, seg_w = [x0], [y0], [theta], [length], [np.ones(n_stems)]
    for side in (-1.0, 1.0):
        # branch roots every 4 pixels along each stem
        per = (length // 4).astype(np.int64)
        stem = np.repeat(np.arange(n_stems), per)
        pos = (np.arange(per.sum()) - np.repeat(np.cumsum(per) - per, per) + 1) * 4.0
        frac = pos / length[stem]
        keep = frac < 1
        stem, pos, frac = stem[keep], pos[keep], frac[keep]
        seg_x.append(x0[stem] + pos * np.cos(theta[stem]))
        seg_y.append(y0[stem] + pos * np.sin(theta[stem]))
        seg_t.append(theta[stem] + side * np.pi / 3)
        seg_l.append(0.45 * length[stem] * (1 - frac) * rng.uniform(0.6, 1.0, stem.size))
        seg_w.append(np.full(stem.size, 0.7))
    sx, sy, st, sl, sw = (np.concatenate(v) for v in (seg_x, seg_y, seg_t, seg_l, seg_w))
    # points every half pixel along every segment
    npts = np.ceil(sl / 0.5).astype(np.int64) + 1
    seg = np.repeat(np.arange(sx.size), npts)
    d = (np.arange(npts.sum()) - np.repeat(np.cumsum(npts) - npts, npts)) * 0.5
    px = np.floor(sx[seg] + d * np.cos(st)[seg]).astype(np.int64) % canvas_size
    py = np.floor(sy[seg] + d * np.sin(st)[seg]).astype(np.int64) % canvas_size
    canvas = np.bincount(py * canvas_size + px, weights=sw[seg] * 0.5,
                         minlength=canvas_size * canvas_size).reshape(canvas_size, canvas_size)
    canvas = ndimage.gaussian_filter(canvas, 0.6, mode="wrap")
    sampled = canvas[scale // 2::scale, scale // 2::scale]
    return 1.0 - np.exp(-2.0 * sampled)


def frost_layer(rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """A procedural frost crop: uint8 (size, size, 3), tinted like one of the reference's photographs.

    The three channels share one luminance pattern (crystals plus the smooth field), scaled per channel.
    """
    mean, spread, within, smooth_share, polarity = FROST_PROFILES[int(rng.integers(len(FROST_PROFILES)))]
    offset = rng.standard_normal()
    crystals = _standardise(ice_crystals(rng, size))
    smooth = _standardise(ndimage.gaussian_filter(rng.standard_normal((size, size)), FROST_SMOOTH_SIGMA,
                                                  mode="wrap"))
    lum = np.sqrt(smooth_share) * smooth + np.sqrt(1 - smooth_share) * polarity * crystals
    rgb = (np.asarray(mean) + np.asarray(spread) * offset)[None, None, :] + np.asarray(within) * lum[..., None]
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------- corruptions
# Each takes the uint8 batch, the per-image generators and the severity; returns floats in [0, 255]
# (cast by _truncate_u8) or uint8.

def _gaussian_blur(x: np.ndarray, rngs, severity: int) -> np.ndarray:
    y = _gaussian(x / 255.0, GAUSSIAN_BLUR[severity - 1])
    return np.clip(y, 0, 1) * 255


def _glass_blur(x: np.ndarray, rngs, severity: int) -> np.ndarray:
    sigma, max_delta, passes = GLASS_BLUR[severity - 1]
    # The reference's per-pixel "swap" assigns numpy views, so it copies: pixel (h, w) takes the
    # value at (h + dy, w + dx), dx, dy uniform in [-max_delta, max_delta), visiting h and w from
    # 32 - max_delta down to max_delta + 1. With max_delta = 1 every source lies at a position not yet
    # visited in the pass, so a pass is one gather from the pass's input.
    if max_delta != 1:
        raise NotImplementedError("the single-gather pass holds for max_delta = 1 (all CIFAR severities)")
    n, size = x.shape[0], x.shape[1]
    y = (_gaussian(x / 255.0, sigma) * 255).astype(np.uint8)
    span = np.arange(size - max_delta, max_delta, -1)  # visiting order of h and of w
    draws = np.stack([g.integers(-max_delta, max_delta, size=(passes, span.size, span.size, 2)) for g in rngs])
    batch = np.arange(n)[:, None, None]
    for p in range(passes):
        dx, dy = draws[:, p, :, :, 0], draws[:, p, :, :, 1]
        src_r = span[None, :, None] + dy
        src_c = span[None, None, :] + dx
        y[:, span[:, None], span[None, :]] = y[batch, src_r, src_c]
    return np.clip(_gaussian(y / 255.0, sigma), 0, 1) * 255


def defocus_kernel(radius: float, alias_sigma: float) -> np.ndarray:
    """Normalised pixel disk of ``radius`` smoothed by a 3x3 Gaussian of ``alias_sigma``, zero rows/cols cut."""
    half = int(np.ceil(radius)) + 1
    ax = np.arange(-half, half + 1)
    yy, xx = np.meshgrid(ax, ax, indexing="ij")
    disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float64)
    disk /= disk.sum()
    g = np.exp(-np.arange(-1, 2) ** 2 / (2.0 * alias_sigma ** 2))
    g /= g.sum()
    kernel = ndimage.convolve1d(ndimage.convolve1d(disk, g, axis=0, mode="constant"), g, axis=1, mode="constant")
    return kernel / kernel.sum()


def _defocus_blur(x: np.ndarray, rngs, severity: int) -> np.ndarray:
    kernel = defocus_kernel(*DEFOCUS_BLUR[severity - 1])
    y = ndimage.correlate(x / 255.0, kernel[None, :, :, None], mode="mirror")
    return np.clip(y, 0, 1) * 255


def _motion_blur(x: np.ndarray, rngs, severity: int) -> np.ndarray:
    radius, sigma = MOTION_BLUR[severity - 1]
    angles = np.array([g.uniform(*MOTION_ANGLE) for g in rngs])
    y = motion_blur_batch(x.astype(np.float64), radius, sigma, angles)
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def _snow(x: np.ndarray, rngs, severity: int) -> np.ndarray:
    mean, std, zoom, threshold, radius, sigma, keep = SNOW[severity - 1]
    size = x.shape[1]
    layers, angles = [], []
    for g in rngs:
        layer = _centre_zoom(g.normal(mean, std, (size, size)), zoom)
        layer = np.where(layer < threshold, 0.0, layer)
        layers.append((np.clip(layer, 0, 1) * 255).astype(np.uint8))
        angles.append(g.uniform(*SNOW_ANGLE))
    layer8 = np.stack(layers)[..., None].astype(np.float64)
    snow = np.clip(np.rint(motion_blur_batch(layer8, radius, sigma, np.array(angles))), 0, 255) / 255.0
    img = x.astype(np.float32) / 255.0
    grey = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = keep * img + (1 - keep) * np.maximum(img, grey[..., None] * 1.5 + 0.5)
    out = img + snow + snow[:, ::-1, ::-1]
    return np.clip(out, 0, 1) * 255


def _frost(x: np.ndarray, rngs, severity: int) -> np.ndarray:
    keep, amount = FROST[severity - 1]
    layers = np.stack([frost_layer(g, x.shape[1]) for g in rngs]).astype(np.float64)
    return np.clip(keep * x.astype(np.float64) + amount * layers, 0, 255)


def _fog(x: np.ndarray, rngs, severity: int) -> np.ndarray:
    strength, decay = FOG[severity - 1]
    img = x / 255.0
    peak = img.max(axis=(1, 2, 3), keepdims=True)
    size = x.shape[1]
    noise = np.stack([g.uniform(-1, 1, size * size - 1) for g in rngs])
    fractal = plasma_fractals(noise, size, decay)[..., None]
    out = (img + strength * fractal) * peak / (peak + strength)
    return np.clip(out, 0, 1) * 255


def _brightness(x: np.ndarray, rngs, severity: int) -> np.ndarray:
    # Adding c to HSV value with hue and saturation fixed scales RGB by V'/V (V = max channel);
    # a black pixel (V = 0, saturation 0) becomes grey V' = c.
    c = BRIGHTNESS[severity - 1]
    img = x / 255.0
    v = img.max(axis=-1, keepdims=True)
    v_new = np.minimum(v + c, 1.0)
    scale = np.divide(v_new, v, out=np.zeros_like(v), where=v > 0)
    out = np.where(v > 0, img * scale, v_new)
    return np.clip(out, 0, 1) * 255


def _contrast(x: np.ndarray, rngs, severity: int) -> np.ndarray:
    c = CONTRAST[severity - 1]
    img = x / 255.0
    means = img.mean(axis=(1, 2), keepdims=True)
    return np.clip((img - means) * c + means, 0, 1) * 255


def warp_affine(img: np.ndarray, src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Warp an (H, W, C) image by the affine map taking the three (x, y) points ``src`` to ``dst``.

    Output pixel p samples the input at the inverse map of p, bilinearly, borders reflected about the
    edge pixels (OpenCV's warpAffine of getAffineTransform(src, dst) with BORDER_REFLECT_101).
    """
    design = np.hstack([np.asarray(src, np.float64), np.ones((3, 1))])
    forward = np.vstack([np.linalg.solve(design, np.asarray(dst, np.float64)).T, [0, 0, 1]])
    inverse = np.linalg.inv(forward)  # output (x, y) -> input (x, y)
    matrix = np.eye(3)  # scipy indexes (row, col, channel) = (y, x, c)
    matrix[:2, :2] = inverse[:2, :2][::-1, ::-1]
    offset = np.array([inverse[1, 2], inverse[0, 2], 0.0])
    return ndimage.affine_transform(img, matrix, offset=offset, order=1, mode="mirror")


def _elastic_transform(x: np.ndarray, rngs, severity: int) -> np.ndarray:
    alpha, sigma, jitter = ELASTIC[severity - 1]
    n, h, w, ch = x.shape
    centre = np.float32(h // 2)
    side = min(h, w) // 3
    src = np.array([[centre + side, centre + side], [centre + side, centre - side],
                    [centre - side, centre - side]], dtype=np.float64)  # (x, y) points
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    out = np.empty(x.shape, dtype=np.float64)
    for i, g in enumerate(rngs):
        img = x[i].astype(np.float32) / 255.0
        warped = warp_affine(img, src, src + g.uniform(-jitter, jitter, size=(3, 2)).astype(np.float32))
        dx = ndimage.gaussian_filter(g.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
        dy = ndimage.gaussian_filter(g.uniform(-1, 1, (h, w)), sigma, mode="reflect", truncate=3) * alpha
        coords = np.stack([np.broadcast_to((rows + dy)[..., None], (h, w, ch)),
                           np.broadcast_to((cols + dx)[..., None], (h, w, ch)),
                           np.broadcast_to(np.arange(ch), (h, w, ch))])
        out[i] = ndimage.map_coordinates(warped, coords, order=1, mode="reflect")
    return np.clip(out, 0, 1) * 255


_FUNCS: dict[str, Callable[[np.ndarray, list, int], np.ndarray]] = {
    "defocus_blur": _defocus_blur, "glass_blur": _glass_blur, "motion_blur": _motion_blur,
    "gaussian_blur": _gaussian_blur, "snow": _snow, "frost": _frost, "fog": _fog,
    "brightness": _brightness, "contrast": _contrast, "elastic_transform": _elastic_transform,
}


def _check_name(name: str, severity: int) -> None:
    if name not in _FUNCS:
        raise ValueError(f"unknown corruption {name!r}; choose one of {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of 1-5, got {severity!r}")


def corrupt(images_u8: np.ndarray, name: str, severity: int, indices: Sequence[int] | None = None) -> np.ndarray:
    """Corrupt uint8 NHWC images ``(N, 32, 32, 3)``; returns uint8 of the same shape.

    ``indices`` are the images' positions in their test set (default 0..N-1); image i's randomness
    depends only on (name, severity, indices[i]).
    """
    _check_name(name, severity)
    if hasattr(images_u8, "detach"):
        raise TypeError("corrupt takes a numpy uint8 (N, 32, 32, 3) array; convert a (N, 3, H, W) tensor "
                        "with to_nhwc")
    x = np.asarray(images_u8)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(f"corrupt needs uint8 (N, {IMAGE_SIZE}, {IMAGE_SIZE}, 3) images (CIFAR-C constants are "
                         f"for 32x32 RGB), got {x.dtype} {x.shape}")
    idx = np.arange(x.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.shape != (x.shape[0],):
        raise ValueError(f"need one index per image: {x.shape[0]} images, {idx.size} indices")
    out = np.empty_like(x)
    for start in range(0, x.shape[0], CHUNK):  # bounds the float temporaries; images are independent
        part = slice(start, start + CHUNK)
        y = _FUNCS[name](x[part], _generators(name, severity, idx[part]), severity)
        out[part] = y if y.dtype == np.uint8 else _truncate_u8(y)
    return out


# ------------------------------------------------------------------------------------------ file access

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _array_sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _atomic_write(path: Path, write: Callable[[object], None]) -> None:
    """Write via ``write(file)`` to a temporary file in path's folder, then rename it onto path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on ``folder/.lock`` (POSIX flock; a no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(folder / ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def official_path(data_root: str | os.PathLike, dataset: str, name: str) -> Path | None:
    """``<data_root>/CIFAR-10-C/<name>.npy`` (or CIFAR-100-C) if it exists, else None."""
    folder = OFFICIAL_DIRS.get(dataset)
    if folder is None:
        return None
    path = Path(data_root) / folder / f"{name}.npy"
    return path if path.is_file() else None


def _official_checksums(folder: Path) -> dict[str, str]:
    sums = folder / OFFICIAL_CHECKSUMS
    if not sums.is_file():
        return {}
    table = {}
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            table[parts[1].lstrip("*")] = parts[0].lower()
    return table


def _open_checked(path: Path, shape: tuple[int, ...], checksums: dict[str, str]) -> np.ndarray:
    """Memory-map an official uint8 .npy, refusing a wrong shape/dtype or a listed checksum that differs."""
    fix = f"re-download {path.name} from the official CIFAR-C release (Zenodo) or delete it to generate instead"
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CorruptionDataError(f"{path} is unreadable ({e}); {fix}") from None
    if arr.shape != shape or arr.dtype != np.uint8:
        raise CorruptionDataError(f"{path} has {arr.dtype} {arr.shape}, expected uint8 {shape}; {fix}")
    want = checksums.get(path.name)
    if want is not None and _sha256(path) != want:
        raise CorruptionDataError(f"{path} does not match its sha256 in {path.parent / OFFICIAL_CHECKSUMS}; {fix}")
    return arr


def read_official(data_root: str | os.PathLike, dataset: str, name: str, severity: int,
                  per_severity: int = OFFICIAL_PER_SEVERITY) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 NHWC) and labels (int64) of one severity from the official CIFAR-10-C/100-C files.

    ``<name>.npy`` holds 5 x ``per_severity`` rows, severity s at rows (s-1)*per_severity .. s*per_severity;
    ``labels.npy`` holds the matching labels. Shapes are checked, and sha256 sums too when the folder has
    a ``SHA256SUMS`` file.
    """
    _check_name(name, severity)
    if dataset not in OFFICIAL_DIRS:
        raise ValueError(f"no official corrupted test set for {dataset!r}; known: {', '.join(OFFICIAL_DIRS)}")
    folder = Path(data_root) / OFFICIAL_DIRS[dataset]
    path, labels_path = folder / f"{name}.npy", folder / "labels.npy"
    for p in (path, labels_path):
        if not p.is_file():
            raise CorruptionDataError(f"{p} is missing; download {OFFICIAL_DIRS[dataset]} (Zenodo) into "
                                      f"{data_root}, or drop the folder to generate the corruptions instead")
    checksums = _official_checksums(folder)
    rows = slice((severity - 1) * per_severity, severity * per_severity)
    total = len(SEVERITIES) * per_severity
    images = _open_checked(path, (total, IMAGE_SIZE, IMAGE_SIZE, 3), checksums)
    labels = _open_checked(labels_path, (total,), checksums)
    return np.array(images[rows]), np.array(labels[rows], dtype=np.int64)


def generated_path(data_root: str | os.PathLike, dataset: str, name: str, severity: int) -> Path:
    """Where :func:`load_or_make` caches one generated corruption x severity."""
    return Path(data_root) / f"{dataset}-c-generated" / f"{name}-{severity}.npy"


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        return {"files": {}}
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            raise ValueError("no 'files' table")
    except ValueError as e:
        raise CorruptionDataError(f"{path} is not a valid manifest ({e}); delete it and the .npy files "
                                  f"beside it to regenerate") from None
    return manifest


def load_or_make(data_root: str | os.PathLike, dataset: str, name: str, severity: int,
                 test_images_u8: np.ndarray, prefer_official: bool = True) -> np.ndarray:
    """The corrupted test set (uint8 NHWC, same shape as ``test_images_u8``) for one corruption x severity.

    The official ``<data_root>/CIFAR-10-C/<name>.npy`` (or CIFAR-100-C) is used when present and
    ``prefer_official``. Otherwise the images are generated once, written atomically to
    ``<data_root>/<dataset>-c-generated/<name>-<severity>.npy`` and recorded in that folder's
    ``manifest.json`` (sha256 of the file and of the clean images, generator version); a later call
    returns the file after checking all three.
    """
    _check_name(name, severity)
    clean = np.asarray(test_images_u8)
    official = official_path(data_root, dataset, name) if prefer_official else None
    if official is not None:
        try:
            rows = np.load(official, mmap_mode="r", allow_pickle=False).shape[0]
        except (OSError, ValueError, IndexError):
            rows = None  # read_official names the problem
        if rows == len(SEVERITIES) * OFFICIAL_PER_SEVERITY and clean.shape[0] != OFFICIAL_PER_SEVERITY:
            raise CorruptionDataError(f"{official} holds {OFFICIAL_PER_SEVERITY} images per severity but "
                                      f"{clean.shape[0]} clean images were given; pass the whole test set or "
                                      f"prefer_official=False")
        images, _ = read_official(data_root, dataset, name, severity, per_severity=clean.shape[0])
        return images
    path = generated_path(data_root, dataset, name, severity)
    manifest_path = path.parent / "manifest.json"
    source = _array_sha256(clean)
    fix = f"delete {path} to regenerate it"
    if path.is_file():
        entry = _read_manifest(manifest_path)["files"].get(path.name)
        if entry is None:
            raise CorruptionDataError(f"{path} has no checksum in {manifest_path} (interrupted write?); {fix}")
        if entry.get("sha256") != _sha256(path):
            raise CorruptionDataError(f"{path} does not match its sha256 in {manifest_path}; {fix}")
        if entry.get("generator_version") != GENERATOR_VERSION:
            raise CorruptionDataError(f"{path} was made by corruption generator version "
                                      f"{entry.get('generator_version')}, this is {GENERATOR_VERSION}; {fix}")
        if entry.get("source_sha256") != source:
            raise CorruptionDataError(f"{path} was generated from other clean images than the ones given; {fix}")
        return np.load(path, allow_pickle=False)
    out = corrupt(clean, name, severity)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: np.save(f, out, allow_pickle=False))
    entry = {"sha256": _sha256(path), "shape": list(out.shape), "source_sha256": source,
             "generator_version": GENERATOR_VERSION}
    with _locked(path.parent):
        manifest = _read_manifest(manifest_path)
        manifest["files"][path.name] = entry
        text = json.dumps(manifest, indent=1, sort_keys=True).encode()
        _atomic_write(manifest_path, lambda f: f.write(text))
    return out
