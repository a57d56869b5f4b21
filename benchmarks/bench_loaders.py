"""``ipsd bench --file-loaders``: images/s of the two on-disk loaders on this machine.

Generates an ImageNet-like folder of JPEGs (500x375, smooth content plus noise so files are ~100 KB like
ImageNet's), writes its FFCV copy, then times whole epochs of the torchvision :class:`FolderLoader` and
the :class:`FfcvLoader` at 224 px with the same worker count, for plain batches and for IPS's pairs:
``decode`` counts the uint8 crops the loader delivers (what bounds a GPU run, where normalisation runs on
the GPU), ``batches`` the finished float batches on this CPU (normalisation competing for the same cores).
The first epoch of each is a warm-up (FFCV compiles its pipeline; both fill the page cache). Nothing
asserts a speed.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tabulate import tabulate

from ipsd.data.beton import load_betons, require_ffcv, write_betons
from ipsd.data.folder_loader import FolderLoader
from ipsd.data.folders import read_class_folders
from ipsd.data.batch import Needs

WIDTH, HEIGHT, CLASSES = 500, 375, 10


def make_jpegs(root: Path, images: int, seed: int = 0) -> float:
    """``images`` train JPEGs (+ 10 % as val) over CLASSES class folders; returns the mean file size in KB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for split, n in (("train", images), ("val", max(CLASSES, images // 10))):
        for i in range(n):
            folder = root / split / f"c{i % CLASSES}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT),
                                                                                                 Image.BILINEAR)
            pixels = np.asarray(coarse, dtype=np.int16) + rng.normal(0, 12, (HEIGHT, WIDTH, 3)).astype(np.int16)
            path = folder / f"{i}.jpg"
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)
            sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1e3


def _rates(loader, epoch: int) -> tuple[float, float]:
    """Images/s of one epoch as uint8 crops (decode + crop + flip: the loader's own work), then as finished
    batches (+ normalisation on the training device, here the CPU)."""
    steps = list(loader.sampler.epoch(epoch))
    start = time.perf_counter()
    n = sum(sum(len(block) for block in blocks) for blocks in loader.train_blocks(epoch, steps))
    decode = n / (time.perf_counter() - start)
    start, n = time.perf_counter(), 0
    for batch in loader.epoch(epoch + 1):
        n += len(batch.x) + (len(batch.partner) if batch.partner is not None else 0)
    return decode, n / (time.perf_counter() - start)


def bench_file_loaders(images: int = 2000, workers: int = 2, batch: int = 64, json_path: str | None = None,
                       folder: str | None = None) -> dict[str, Any]:
    require_ffcv()
    from ipsd.data.ffcv_loader import FfcvLoader

    batch = min(batch, images)

    device = torch.device("cpu")
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        root = Path(tmp)
        kb = make_jpegs(root, images)
        data = read_class_folders(root)
        start = time.perf_counter()
        betons = load_betons(write_betons(data, root / "ffcv", workers=workers), "folders")
        write_s = time.perf_counter() - start
        beton_mb = (root / "ffcv" / "train.beton").stat().st_size / 1e6
        out: dict[str, Any] = {"images": images, "workers": workers, "batch": batch, "jpeg_kb": kb,
                               "write_seconds": write_s, "train_beton_mb": beton_mb,
                               "threads": torch.get_num_threads()}
        rows = []
        for needs, label in ((Needs(), "plain"), (Needs(pairs=True), "pairs (IPS)")):
            rates = {}
            for name, make in (("folder", lambda n=needs: FolderLoader(data, device, batch, n, 0, workers=workers)),
                               ("ffcv", lambda n=needs: FfcvLoader(betons, device, batch, n, 0, workers=workers))):
                loader = make()
                _rates(loader, 1)  # warm-up
                rates[f"{name}_decode"], rates[f"{name}_batches"] = _rates(loader, 3)
            for what in ("decode", "batches"):
                ratio = rates[f"ffcv_{what}"] / rates[f"folder_{what}"]
                rates[f"ffcv_over_folder_{what}"] = ratio
                rows.append([f"{label}, {what}", f"{rates[f'folder_{what}']:.0f}", f"{rates[f'ffcv_{what}']:.0f}",
                             f"{ratio:.2f}x"])
            out[label] = rates
    print(f"on-disk loaders, {images} JPEGs of {WIDTH}x{HEIGHT} (mean {kb:.0f} KB) -> 224 px crops, batch {batch}, "
          f"{workers} workers, CPU; FFCV copy written in {write_s:.1f} s ({beton_mb:.0f} MB)")
    print(tabulate(rows, headers=["batches", "folder img/s", "ffcv img/s", "ffcv / folder"]), flush=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n")
    return out
