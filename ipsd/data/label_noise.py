"""Symmetric label noise in the style of the SCE code (Wang et al. 2019): a fixed number of training
labels per class, each flipped to a uniformly drawn different class.

``rate`` is the fraction of labels that end up wrong (not a resampling probability that may redraw the
true class). Exactly M = round(rate * N) labels flip (round half up). Each class gets M // C flips; the
remainder M mod C goes one each to classes 0, 1, ..., (M mod C) - 1. (The SCE code floors both counts
and drops the remainder; the two agree whenever C divides rate * N, as on CIFAR-10/100 at 20/40/80 %.)
"""
from __future__ import annotations

import dataclasses
import hashlib
import math

import torch
from torch import Tensor


def flip_counts(n: int, num_classes: int, rate: float) -> list[int]:
    """Flips per class: round(rate * n) split evenly, the remainder to the lowest class indices."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise rate must lie in [0, 1], got {rate}")
    total = math.floor(rate * n + 0.5)
    base, extra = divmod(total, num_classes)
    return [base + (1 if c < extra else 0) for c in range(num_classes)]


def symmetric_noise(labels: Tensor, num_classes: int, rate: float, seed: int) -> Tensor:
    """A new label vector with ``flip_counts`` labels of each class flipped to a uniformly random other class.

    One ``torch.Generator`` seeded ``seed`` draws, for classes 0..C-1 in order, which of that class's
    samples flip (a random permutation of its indices, first k taken), then the targets of all flipped
    samples in index order: u uniform in 0..C-2, target u + (u >= label). ``labels`` is not modified.
    """
    if labels.dim() != 1 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64 (N,), got {labels.dtype} {tuple(labels.shape)}")
    if num_classes < 2:
        raise ValueError("symmetric noise needs at least 2 classes")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels outside 0..{num_classes - 1}")
    y = labels.detach().cpu()
    g = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c, k in enumerate(flip_counts(y.numel(), num_classes, rate)):
        members = torch.nonzero(y == c).flatten()
        if k > members.numel():
            raise ValueError(f"class {c} has {members.numel()} samples, fewer than its {k} flips")
        chosen.append(members[torch.randperm(members.numel(), generator=g)[:k]])
    idx = torch.sort(torch.cat(chosen)).values
    u = torch.randint(0, num_classes - 1, (idx.numel(),), generator=g)
    noisy = y.clone()
    noisy[idx] = u + (u >= y[idx]).long()
    return noisy.to(labels.device)


def labels_sha256(labels: Tensor) -> str:
    """sha256 hex digest of the labels as little-endian int64 bytes, in order."""
    return hashlib.sha256(labels.detach().cpu().to(torch.int64).numpy().astype("<i8").tobytes()).hexdigest()


def noise_record(clean: Tensor, noisy: Tensor, num_classes: int, rate: float, seed: int) -> dict:
    """What a run stores about its injected noise: settings, counts and a digest of the noisy labels.

    ``flipped_per_class`` counts flips by original class; ``noisy_class_counts`` is the histogram of the
    noisy labels.
    """
    clean, noisy = clean.detach().cpu(), noisy.detach().cpu()
    flipped = clean != noisy
    return {
        "kind": "symmetric",
        "rate": float(rate),
        "seed": int(seed),
        "n": int(clean.numel()),
        "num_flipped": int(flipped.sum()),
        "flipped_per_class": torch.bincount(clean[flipped], minlength=num_classes).tolist(),
        "noisy_class_counts": torch.bincount(noisy, minlength=num_classes).tolist(),
        "sha256": labels_sha256(noisy),
    }


def with_label_noise(data, rate: float, seed: int):
    """A copy of ``data`` (any dataset dataclass with ``train_y`` and ``num_classes``) whose training labels carry
    :func:`symmetric_noise` at ``rate`` with ``seed``, and whose ``label_noise`` attribute is the :func:`noise_record`;
    the test split is the same object as before."""
    noisy = symmetric_noise(data.train_y, data.num_classes, rate, seed)
    out = dataclasses.replace(data, train_y=noisy)
    out.label_noise = noise_record(data.train_y, noisy, data.num_classes, rate, seed)
    return out
