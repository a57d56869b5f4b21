"""Offline fallback: scikit-learn's bundled 8x8 digits, shaped like CIFAR (3x32x32 uint8).

It ships inside scikit-learn, so smoke runs and CI work with no data folder at all.
Results on it are NOT comparable to CIFAR numbers; ``note`` says so.
"""
from __future__ import annotations

import numpy as np
import torch

from ipsd.data.datasets import DATASETS, ImageData

SCALE = 3  # 8x8 -> 24x24 by nearest neighbour
PAD = 4  # 24 + 2*4 = 32
TEST_EVERY = 5  # the 5th, 10th, ... image of each class goes to test


def to_cifar_shape(images: np.ndarray) -> np.ndarray:
    """(N, 8, 8) values 0..16 -> contiguous uint8 (N, 3, 32, 32): scale, upsample x3, pad, 3 channels."""
    x = np.rint(images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    x = x.repeat(SCALE, axis=1).repeat(SCALE, axis=2)
    x = np.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD)))
    return np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1))


def test_mask(labels: np.ndarray) -> np.ndarray:
    """Stratified, deterministic: within each class (file order) every TEST_EVERY-th image is test."""
    mask = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        mask[np.flatnonzero(labels == c)[TEST_EVERY - 1 :: TEST_EVERY]] = True
    return mask


def channel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of [0, 1] pixels (population std, over N, H, W)."""
    f = x.astype(np.float64) / 255.0
    return tuple(f.mean(axis=(0, 2, 3)).tolist()), tuple(f.std(axis=(0, 2, 3)).tolist())


@DATASETS.register("digits")
def load_digits_data(root: str | None = None, download: bool = False) -> ImageData:
    """``root`` and ``download`` are accepted for a uniform loader signature and ignored."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = to_cifar_shape(bunch.images)
    y = bunch.target.astype(np.int64)
    is_test = test_mask(y)
    train_x, test_x = x[~is_test], x[is_test]
    mean, std = channel_stats(train_x)
    return ImageData(
        name="digits",
        train_x=torch.from_numpy(np.ascontiguousarray(train_x)),
        train_y=torch.from_numpy(y[~is_test]),
        test_x=torch.from_numpy(np.ascontiguousarray(test_x)),
        test_y=torch.from_numpy(y[is_test]),
        classes=[str(int(c)) for c in bunch.target_names],
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        note=(f"digits fallback: scikit-learn 8x8 handwritten digits upsampled to 32x32 "
              f"({len(train_x)} train / {len(test_x)} test); not CIFAR, results are not comparable"),
    )
