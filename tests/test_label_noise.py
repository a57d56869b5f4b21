"""Symmetric label noise: exact counts, never the same class, seeding, uniform targets, the record."""
from __future__ import annotations

import hashlib
import struct

import pytest
import torch
from scipy.stats import chi2

from ipsd.data.label_noise import flip_counts, noise_record, symmetric_noise


def balanced(per_class: int, classes: int, seed: int = 0) -> torch.Tensor:
    y = torch.arange(classes).repeat_interleave(per_class)
    return y[torch.randperm(y.numel(), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("rate", [0.2, 0.4, 0.8])
def test_exact_counts_per_class_and_never_the_same_class(rate):
    y = balanced(500, 10)  # N = 5000: rate * N / C = 100, 200, 400 flips per class
    noisy = symmetric_noise(y, 10, rate, seed=1)
    flipped = noisy != y
    assert int(flipped.sum()) == round(rate * 5000)
    assert torch.bincount(y[flipped], minlength=10).tolist() == [round(rate * 500)] * 10
    assert torch.equal(noisy[~flipped], y[~flipped])  # every selected label changed: no flip to itself


def test_remainder_goes_to_the_lowest_classes():
    # N = 30, C = 4, rate 0.5: 15 flips = 4 * 3 + 3 -> classes 0, 1, 2 get 4, class 3 gets 3
    assert flip_counts(30, 4, 0.5) == [4, 4, 4, 3]
    y = balanced(8, 4, seed=2)[:30]  # slightly unbalanced, every class has >= 4
    noisy = symmetric_noise(y, 4, 0.5, seed=0)
    assert torch.bincount(y[noisy != y], minlength=4).tolist() == [4, 4, 4, 3]
    # round half up: 0.25 * 10 = 2.5 -> 3
    assert sum(flip_counts(10, 3, 0.25)) == 3


def test_rate_zero_is_the_identity_and_input_untouched():
    y = balanced(20, 5)
    keep = y.clone()
    assert torch.equal(symmetric_noise(y, 5, 0.0, seed=3), y)
    symmetric_noise(y, 5, 0.6, seed=3)
    assert torch.equal(y, keep)


def test_deterministic_per_seed_and_seeds_differ():
    y = balanced(100, 10)
    a, b = symmetric_noise(y, 10, 0.4, seed=7), symmetric_noise(y, 10, 0.4, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, symmetric_noise(y, 10, 0.4, seed=8))


def test_targets_are_uniform_over_the_other_classes():
    # 10 classes x 1000, rate 0.9: 900 flips per class, 100 expected per (source, other target) cell.
    y = balanced(1000, 10)
    noisy = symmetric_noise(y, 10, 0.9, seed=0)
    f = noisy != y
    table = torch.zeros(10, 10)
    table.index_put_((y[f], noisy[f]), torch.ones(int(f.sum())), accumulate=True)
    assert table.diagonal().sum() == 0
    off = table[~torch.eye(10, dtype=torch.bool)]
    assert (off > 0).all()  # every other class is reached from every class
    stat = float(((off - 100.0) ** 2 / 100.0).sum())  # Pearson chi-square, 10 rows x 8 free cells
    assert stat < chi2.ppf(0.999, df=80)


def test_two_classes_always_swap():
    y = balanced(10, 2)
    noisy = symmetric_noise(y, 2, 1.0, seed=0)
    assert torch.equal(noisy, 1 - y)


def test_record():
    y = balanced(6, 3)
    noisy = symmetric_noise(y, 3, 0.5, seed=4)
    rec = noise_record(y, noisy, 3, 0.5, 4)
    # 9 flips, 3 per class
    assert (rec["rate"], rec["seed"], rec["n"], rec["num_flipped"]) == (0.5, 4, 18, 9)
    assert rec["flipped_per_class"] == [3, 3, 3]
    assert rec["noisy_class_counts"] == [sum(int(v) == c for v in noisy) for c in range(3)]
    packed = struct.pack("<18q", *[int(v) for v in noisy])
    assert rec["sha256"] == hashlib.sha256(packed).hexdigest()
    assert rec["sha256"] != noise_record(y, y, 3, 0.0, 4)["sha256"]


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        symmetric_noise(torch.tensor([0, 1, 2]), 2, 0.1, 0)  # label outside 0..1
    with pytest.raises(ValueError):
        symmetric_noise(torch.tensor([0, 1, 1]), 2, 1.0, 0)  # 3 flips: class 0 gets 2 (remainder) but has 1 sample
    with pytest.raises(ValueError):
        symmetric_noise(torch.tensor([0, 1]), 2, 1.5, 0)
