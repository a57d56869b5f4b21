"""Dataset container, registry, data-root resolution and deterministic subsetting.

Every reader returns one in-memory :class:`ImageData` (uint8 images + int64 labels) so the
training code never depends on torchvision's PIL-based datasets and a whole split fits a GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from ipsd.errors import DataError  # noqa: F401 -- data modules raise it from here
from ipsd.registry import Registry

ENV_DATA = "IPSD_DATA"


@dataclass
class ImageData:
    """Both splits of an image-classification dataset, kept as compact uint8 tensors."""

    name: str
    train_x: Tensor  # uint8 (N, 3, H, W), contiguous
    train_y: Tensor  # int64 (N,)
    test_x: Tensor
    test_y: Tensor
    classes: list[str]
    mean: tuple[float, float, float]  # of [0, 1] pixels, per channel
    std: tuple[float, float, float]
    note: str = ""  # shown to the user, e.g. when a fallback dataset is used

    def __post_init__(self) -> None:
        # Fail here, at construction, rather than deep inside a training step.
        for split, x, y in (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y)):
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3 or not x.is_contiguous():
                raise ValueError(f"{self.name} {split}_x must be contiguous uint8 (N, 3, H, W), got "
                                 f"{x.dtype} {tuple(x.shape)}")
            check_labels(self.name, split, y, x.shape[0])
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise ValueError(f"{self.name}: train and test image shapes differ")
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[2])


DATASETS = Registry[Callable[..., ImageData]]("dataset")


def check_labels(name: str, split: str, y: Tensor, n: int, num_classes: int | None = None) -> None:
    """A split's labels: int64 of shape (n,) and, when ``num_classes`` is given, in 0..num_classes-1."""
    if y.dtype != torch.int64 or y.shape != (n,):
        raise ValueError(f"{name} {split}_y must be int64 ({n},), got {y.dtype} {tuple(y.shape)}")
    if num_classes is not None and y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"{name} {split}_y has labels outside 0..{num_classes - 1}")


def resolve_root(root: str | None) -> Path | None:
    """Root from config/CLI, else env IPSD_DATA, else None (callers decide what None means)."""
    chosen = root if root else os.environ.get(ENV_DATA) or None
    return Path(chosen).expanduser() if chosen else None


def load_dataset(name: str, root: str | None = None, download: bool = False) -> ImageData:
    """Look ``name`` up in DATASETS and load it; downloads only when asked to."""
    return DATASETS.get(name)(root=root, download=download)


def _first_per_class(y: Tensor, classes: list[int], k: int | None, split: str) -> Tensor:
    """Indices (file order) of the first ``k`` images of each class; all of them when k is None."""
    picked = []
    for c in classes:
        idx = torch.nonzero(y == c).flatten()
        if k is not None:
            if idx.numel() < k:
                raise ValueError(f"class {c} has only {idx.numel()} {split} images, asked for {k}")
            idx = idx[:k]
        picked.append(idx)
    return torch.sort(torch.cat(picked)).values


def _relabel(y: Tensor, classes: list[int], num_classes: int) -> Tensor:
    table = torch.full((num_classes,), -1, dtype=torch.int64)
    table[torch.tensor(classes, dtype=torch.int64)] = torch.arange(len(classes), dtype=torch.int64)
    return table[y]


def subset_selection(data, per_class: int | None = None, classes: list[int] | None = None,
                     test_per_class: int | None = None) -> tuple[Tensor, Tensor, dict[str, object]]:
    """What a deterministic subset keeps, for any dataset with ``train_y``/``test_y``/``classes``: the
    train and test indices (file order) and the relabelled ``train_y``/``test_y``/``classes`` fields."""
    n = data.num_classes
    keep = list(range(n)) if classes is None else [int(c) for c in classes]
    if not keep:
        raise ValueError("subset: `classes` must not be empty")
    bad = [c for c in keep if not 0 <= c < n]
    if bad:
        raise ValueError(f"subset: class index {bad} out of range for {data.name} (0..{n - 1})")
    if len(set(keep)) != len(keep):
        raise ValueError(f"subset: duplicate class in {keep}")
    for arg, value in (("per_class", per_class), ("test_per_class", test_per_class)):
        if value is not None and value < 1:
            raise ValueError(f"subset: {arg} must be >= 1, got {value}")
    tr = _first_per_class(data.train_y, keep, per_class, "train")
    te = _first_per_class(data.test_y, keep, test_per_class, "test")
    fields = {"train_y": _relabel(data.train_y[tr], keep, n), "test_y": _relabel(data.test_y[te], keep, n),
              "classes": [data.classes[c] for c in keep]}
    return tr, te, fields


def subset(
    data: ImageData,
    per_class: int | None = None,
    classes: list[int] | None = None,
    test_per_class: int | None = None,
) -> ImageData:
    """Deterministic small subset: the first ``per_class`` train images of each class in file order
    (and the first ``test_per_class`` test images); with ``classes``, keep only those and relabel
    them 0..len-1 in the given order. Images keep their original relative order."""
    tr, te, fields = subset_selection(data, per_class, classes, test_per_class)
    return replace(data, train_x=data.train_x[tr].contiguous(), test_x=data.test_x[te].contiguous(), **fields)


def subset_items(data, per_class: int | None = None, classes: list[int] | None = None,
                 test_per_class: int | None = None):
    """:func:`subset` for datasets read per batch (file lists, FFCV rows): the same selection, applied to
    the per-image items named by ``data.ITEMS`` (train, test), which keep their relative order."""
    tr, te, fields = subset_selection(data, per_class, classes, test_per_class)
    train_items, test_items = data.ITEMS
    pick = {train_items: tr, test_items: te}
    items = {name: [getattr(data, name)[i] for i in idx.tolist()] if isinstance(getattr(data, name), list)
             else getattr(data, name)[idx] for name, idx in pick.items()}
    return replace(data, **items, **fields)
