"""FFCV ``.beton`` copies of on-disk datasets: writing them (``ipsd data to-ffcv``) and reading their index.

A copy is one folder holding ``train.beton``, ``test.beton`` and ``meta.json`` (dataset name, classes,
normalisation, per-split sample count and label checksum, write settings, FFCV version). Each beton has
two fields, ``image`` (RGBImageField) and ``label`` (IntField, the dataset's own 0-based label). The
default folder is ``<data_root>/ffcv/<dataset>`` (config key ``ffcv_dir`` overrides it).

Writing is all-or-nothing: each beton is written under a temporary name and renamed, and ``meta.json``
(which readers require) is written last, so an interrupted conversion leaves no copy that looks complete.
Reading needs only this folder, not the original images: labels come from the betons' own metadata
and are checked against ``meta.json``.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..runs import atomic_write_json
from .datasets import DataError
from .folders import FileDataset, open_rgb

FORMAT = 1
SPLITS = ("train", "test")
INSTALL_HINT = ("FFCV is not installed. Install its system libraries and the extra: "
                "`apt-get install libturbojpeg0-dev libopencv-dev pkg-config` then `pip install -e '.[ffcv]'` "
                "(the Makefile does the second when the libraries are present); or use loader=folder (slower)")


def require_ffcv() -> None:
    """Import FFCV or fail with the install hint (never fall back silently)."""
    try:
        import ffcv  # noqa: F401
    except ImportError as e:
        raise DataError(f"{INSTALL_HINT}. Import error: {e}") from None


def default_folder(data_root: str | os.PathLike[str] | None, dataset: str) -> Path | None:
    return Path(data_root).expanduser() / "ffcv" / dataset if data_root else None


def _labels_sha256(labels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(labels, dtype="<i8").tobytes()).hexdigest()


class _Images:
    """Indexable (PIL RGB image, label) view of one split, as FFCV's writer reads it (picklable)."""

    def __init__(self, paths: list[Path], labels: Tensor):
        self.paths, self.labels = [str(p) for p in paths], labels.tolist()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Image.Image, int]:
        return open_rgb(self.paths[i]), self.labels[i]


def write_betons(data: FileDataset, folder: str | os.PathLike[str], max_resolution: int = 512,
                 jpeg_quality: int = 90, write_mode: str = "jpg", workers: int = -1) -> Path:
    """Write ``folder/{train,test}.beton`` and ``meta.json`` for a file dataset; returns the folder.

    Defaults follow FFCV's ImageNet recipe: the longer side is capped at ``max_resolution`` and every image
    is stored as JPEG at ``jpeg_quality`` (``write_mode`` raw | smart | proportion | jpg, FFCV's own)."""
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    if write_mode not in ("raw", "smart", "proportion", "jpg"):
        raise ValueError(f"write_mode={write_mode!r}; use raw | smart | proportion | jpg")
    if not (max_resolution >= 16 and 1 <= jpeg_quality <= 100):
        raise ValueError(f"max_resolution={max_resolution} must be >= 16 and jpeg_quality={jpeg_quality} in 1..100")
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # the copy is incomplete until meta.json is back
    splits = {}
    for split, paths, y in (("train", data.train_paths, data.train_y), ("test", data.test_paths, data.test_y)):
        final, tmp = folder / f"{split}.beton", folder / f".{split}.beton.partial"
        fields = {"image": RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                         jpeg_quality=jpeg_quality),
                  "label": IntField()}
        try:
            DatasetWriter(str(tmp), fields, num_workers=workers).from_indexed_dataset(_Images(paths, y))
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        splits[split] = {"file": final.name, "count": len(paths), "labels_sha256": _labels_sha256(y.numpy())}
    import ffcv

    atomic_write_json(folder / "meta.json", {
        "format": FORMAT, "dataset": data.name, "source": str(data.root), "classes": list(data.classes),
        "mean": list(data.mean), "std": list(data.std), "splits": splits, "ffcv": ffcv.__version__,
        "write": {"max_resolution": max_resolution, "jpeg_quality": jpeg_quality, "write_mode": write_mode}})
    return folder


@dataclass
class BetonDataset:
    """A dataset's FFCV copy: rows of the two betons (a subset keeps some rows) and their labels."""

    name: str
    folder: Path
    train_rows: Tensor  # int64 row numbers in train.beton
    train_y: Tensor  # int64, 0-based (relabelled by a class subset)
    test_rows: Tensor
    test_y: Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    meta: dict[str, Any]

    ITEMS: ClassVar[tuple[str, str]] = ("train_rows", "test_rows")  # what a subset selects (subset_items)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def file(self, split: str) -> Path:
        return self.folder / self.meta["splits"][split]["file"]

    def provenance(self) -> dict[str, Any]:
        """What a run record keeps of the copy it trained on."""
        return {"folder": str(self.folder), "ffcv": self.meta["ffcv"], "write": self.meta["write"],
                "source": self.meta["source"]}


def read_beton_labels(path: Path) -> np.ndarray:
    """The ``label`` field of every row, from the beton's metadata table (no image is read)."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    if "label" not in reader.field_names:
        raise DataError(f"{path} has fields {reader.field_names}, expected 'image' and 'label' "
                        f"(write it with `ipsd data to-ffcv`)")
    return np.array(reader.metadata[f"f{reader.field_names.index('label')}"], dtype=np.int64)  # a writable copy


def load_betons(folder: str | os.PathLike[str], dataset: str) -> BetonDataset:
    """Open an FFCV copy written by :func:`write_betons`, checking it is complete and of ``dataset``."""
    require_ffcv()
    folder = Path(folder).expanduser()
    meta_path = folder / "meta.json"
    hint = f"write it with `ipsd data to-ffcv dataset={dataset} data_root=<dataset root> ffcv_dir={folder}`"
    if not meta_path.is_file():
        raise DataError(f"no complete FFCV copy of {dataset} in {folder} (missing meta.json); {hint}")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT or meta.get("dataset") != dataset:
        raise DataError(f"{meta_path} describes dataset {meta.get('dataset')!r} (format {meta.get('format')}), "
                        f"expected {dataset!r} (format {FORMAT}); {hint}")
    labels = {}
    for split in SPLITS:
        info = meta["splits"][split]
        path = folder / info["file"]
        if not path.is_file():
            raise DataError(f"missing {path}; {hint}")
        y = read_beton_labels(path)
        if len(y) != info["count"] or _labels_sha256(y) != info["labels_sha256"]:
            raise DataError(f"{path} does not match {meta_path} ({len(y)} rows, {info['count']} recorded, or "
                            f"different labels); {hint}")
        labels[split] = torch.from_numpy(y)
    return BetonDataset(name=dataset, folder=folder,
                        train_rows=torch.arange(len(labels["train"])), train_y=labels["train"],
                        test_rows=torch.arange(len(labels["test"])), test_y=labels["test"],
                        classes=list(meta["classes"]), mean=tuple(meta["mean"]), std=tuple(meta["std"]), meta=meta)
