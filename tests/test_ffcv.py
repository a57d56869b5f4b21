"""FFCV backend: `ipsd data to-ffcv` copies, their checks, and FfcvLoader batches on a tiny JPEG dataset.

Every image is one flat colour, unique per image, so the mean colour of any crop names the image it came
from: that is how the tests check that each block of a step holds exactly the images the sampler chose
(anchors, same-class partners, second views), whatever FFCV does with crops and threads.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipsd.cli import main
from ipsd.config import ConfigError, load_run_config
from ipsd.data import DataError
from ipsd.data.beton import load_betons, write_betons
from ipsd.data.datasets import subset_items
from ipsd.data.folders import IMAGENET_MEAN, IMAGENET_STD, read_class_folders
from ipsd.engine import train
from ipsd.resolve import resolve
from ipsd.data.batch import Needs
from ipsd.rng import generator

CLASSES, TRAIN, VAL, CROP = 3, 5, 2, 16
CPU = torch.device("cpu")


def colour(c: int, i: int, split: str) -> tuple[int, int, int]:
    return 40 + 70 * c, 30 + 35 * i, 60 if split == "train" else 200


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("flat")
    for c in range(CLASSES):
        for split, n in (("train", TRAIN), ("val", VAL)):
            folder = base / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):  # sizes vary, so crops of non-square images are exercised
                pixels = np.empty((36 + 4 * i, 44, 3), dtype=np.uint8)
                pixels[:] = colour(c, i, split)
                Image.fromarray(pixels).save(folder / f"img{i}.jpg", quality=95)
    return base


@pytest.fixture(scope="module")
def data(root):
    return read_class_folders(root)


@pytest.fixture(scope="module")
def copy(ffcv_installed, data, tmp_path_factory):
    return write_betons(data, tmp_path_factory.mktemp("ffcv") / "folders", workers=1)


@pytest.fixture(scope="module")
def betons(copy):
    return load_betons(copy, "folders")


def palette(split: str) -> torch.Tensor:
    """Row k = the colour of image k of the split, in the reader's order (class, then file name)."""
    n = TRAIN if split == "train" else VAL
    return torch.tensor([colour(c, i, split) for c in range(CLASSES) for i in range(n)], dtype=torch.float32)


def identify(x: torch.Tensor, split: str) -> torch.Tensor:
    """Which image each normalised crop shows: nearest palette colour, required to be close (JPEG rounding)."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = ((x * std + mean) * 255).mean((2, 3))
    dist = torch.cdist(rgb, palette(split))
    assert (dist.min(1).values < 8).all(), "a crop is not one of the flat images"
    return dist.argmin(1)


def ffcv_loader(betons, needs=None, batch=4, rank=0, world=1, seed=0):
    from ipsd.data.ffcv_loader import FfcvLoader

    return FfcvLoader(betons, CPU, batch, needs or Needs(), seed, rank, world, image_size=CROP, workers=1)


def test_copy_round_trip(copy, betons, data):
    meta = json.loads((copy / "meta.json").read_text())
    assert meta["dataset"] == "folders" and meta["classes"] == data.classes
    assert meta["splits"]["train"]["count"] == CLASSES * TRAIN and meta["splits"]["test"]["count"] == CLASSES * VAL
    assert torch.equal(betons.train_y, data.train_y) and torch.equal(betons.test_y, data.test_y)
    assert betons.train_rows.tolist() == list(range(CLASSES * TRAIN))
    assert not list(copy.glob(".*partial"))


def test_pair_blocks_hold_the_sampled_images(betons, data):
    ld = ffcv_loader(betons, Needs(pairs=True))
    assert ld.images_per_step == 8
    seen = []
    for b in ld.epoch(1):
        assert b.x.shape == (len(b.index), 3, CROP, CROP) and b.x.dtype == torch.float32 and b.x.is_contiguous()
        assert torch.equal(identify(b.x, "train"), b.index)
        assert torch.equal(identify(b.partner, "train"), b.partner_index)
        assert torch.equal(b.y, data.train_y[b.index]) and torch.equal(data.train_y[b.partner_index], b.y)
        assert (b.partner_index != b.index).all()
        seen += b.index.tolist()
    assert sorted(seen) == list(range(CLASSES * TRAIN))  # the short last step lines up too (15 = 3 x 4 + 3)


def test_second_view_is_the_anchor_image(betons):
    for b in ffcv_loader(betons, Needs(views=2)).epoch(2):
        assert torch.equal(identify(b.view2, "train"), b.index) and b.partner is None


def test_same_order_as_the_folder_loader(betons, data):
    from ipsd.data.folder_loader import FolderLoader

    folder = FolderLoader(data, CPU, 4, Needs(pairs=True), 3, image_size=CROP, workers=0)
    for a, b in zip(ffcv_loader(betons, Needs(pairs=True), seed=3).epoch(5), folder.epoch(5), strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.partner_index, b.partner_index)


def test_ranks_split_steps_and_test_set(betons, data):
    one = list(ffcv_loader(betons, batch=4).epoch(1))
    two = [list(ffcv_loader(betons, batch=4, rank=r, world=2).epoch(1)) for r in range(2)]
    for k, b in enumerate(one):
        union = torch.cat([two[0][k].index, two[1][k].index]).tolist()
        if k < len(one) - 1:
            assert sorted(union) == sorted(b.index.tolist())
        else:  # 15 images over 2 ranks: the last anchor of the permutation is dropped
            assert len(union) == len(b.index) - 1 and set(union) < set(b.index.tolist())
        for part in (two[0][k], two[1][k]):
            assert torch.equal(identify(part.x, "train"), part.index)
    shards = [list(ffcv_loader(betons, rank=r, world=2).test_batches(2)) for r in range(2)]
    xs, ys = zip(*[xy for shard in shards for xy in shard])
    assert torch.equal(identify(torch.cat(xs), "test"), torch.arange(CLASSES * VAL))  # every image once, in order
    assert torch.equal(torch.cat(ys), data.test_y)


def test_subset_reads_the_selected_rows(betons):
    sub = subset_items(betons, per_class=2, classes=[2, 0], test_per_class=1)
    assert sub.train_rows.tolist() == [0, 1, 10, 11] and sub.train_y.tolist() == [1, 1, 0, 0]
    for b in ffcv_loader(sub, batch=2).epoch(1):
        assert torch.equal(identify(b.x, "train"), sub.train_rows[b.index])
    (x, y), = list(ffcv_loader(sub).test_batches(8))
    assert identify(x, "test").tolist() == [0, 4] and y.tolist() == [1, 0]


def test_flip_mirrors_a_seeded_half(betons):
    ld = ffcv_loader(betons)
    x = torch.arange(64 * 3 * 2 * 5, dtype=torch.float32).view(64, 3, 2, 5)
    out = ld._flip(x, generator(CPU, "flip", 0, 1, 0))
    mirrored = [bool(torch.equal(o, xi.flip(-1))) for o, xi in zip(out, x)]
    kept = [bool(torch.equal(o, xi)) for o, xi in zip(out, x)]
    assert all(m != k for m, k in zip(mirrored, kept)) and 16 < sum(mirrored) < 48
    assert torch.equal(out, ld._flip(x, generator(CPU, "flip", 0, 1, 0)))


def test_incomplete_or_foreign_copy_is_refused(copy, tmp_path):
    broken = tmp_path / "c"
    shutil.copytree(copy, broken)
    meta = json.loads((broken / "meta.json").read_text())
    with pytest.raises(DataError, match="expected 'cub200'"):
        load_betons(broken, "cub200")
    meta["splits"]["train"]["count"] += 1
    (broken / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="does not match"):
        load_betons(broken, "folders")
    (broken / "meta.json").unlink()
    with pytest.raises(DataError, match="ipsd data to-ffcv"):
        load_betons(broken, "folders")


def test_interrupted_write_leaves_no_complete_looking_copy(ffcv_installed, data, copy, tmp_path, monkeypatch):
    import ffcv.writer

    target = tmp_path / "c"
    shutil.copytree(copy, target)  # an older complete copy is being overwritten
    calls = []

    def fail_on_second(self, dataset, **kw):
        calls.append(len(dataset))
        if len(calls) == 2:
            raise RuntimeError("disk full")
        return real(self, dataset, **kw)

    real = ffcv.writer.DatasetWriter.from_indexed_dataset
    monkeypatch.setattr(ffcv.writer.DatasetWriter, "from_indexed_dataset", fail_on_second)
    with pytest.raises(RuntimeError, match="disk full"):
        write_betons(data, target, workers=1)
    assert not (target / "meta.json").exists() and not list(target.glob(".*partial"))
    with pytest.raises(DataError, match="missing meta.json"):
        load_betons(target, "folders")


def test_loader_choice_is_checked():
    with pytest.raises(ConfigError, match="loader=ffcv does not fit dataset=cifar10"):
        resolve(load_run_config(None, ["dataset=cifar10", "loader=ffcv"]))
    with pytest.raises(ConfigError, match="loader=memory does not fit dataset=folders"):
        resolve(load_run_config(None, ["dataset=folders", "loader=memory"]))
    assert resolve(load_run_config(None, ["dataset=folders"])).cfg.loader == "folder"
    assert resolve(load_run_config(None, [])).cfg.loader == "memory"


def test_ffcv_missing_fails_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` now raises ImportError
    res = resolve(load_run_config(None, ["dataset=imagenet", "loader=ffcv"]))  # planning needs no FFCV ...
    from ipsd.engine import check_environment

    with pytest.raises(ConfigError, match="apt-get install libturbojpeg0-dev libopencv-dev pkg-config"):
        check_environment(res.cfg)  # ... training does: checked where it starts


@pytest.mark.parametrize("method", ["hard", "ips"])
def test_engine_trains_one_epoch_through_ffcv(tmp_path, copy, method):
    args = [f"method={method}", "dataset=folders", "loader=ffcv", f"ffcv_dir={copy}", "model=resnet8",
            "image_size=32", "workers=1", "epochs=1", "batch_size=6", "eval_batch_size=4", "progress=false",
            "device=cpu", f"out={tmp_path}"]
    folder = train(load_run_config(None, args))
    result = json.loads((folder / "result.json").read_text())
    assert result["config"]["loader"] == "ffcv" and result["ffcv_copy"]["folder"] == str(copy)
    assert result["images_per_step"] == (12 if method == "ips" else 6) and result["final"]["epoch"] == 1
    assert 0 <= result["final"]["top1"] <= 100
    folder_run = resolve(load_run_config(None, [a for a in args if not a.startswith(("loader", "ffcv_dir"))]))
    assert folder_run.run_id != folder.name  # the loader is part of what a run computes


def test_cli_writes_a_copy(ffcv_installed, root, tmp_path, capsys):
    assert main(["data", "to-ffcv", "dataset=folders", f"data_root={root}", f"ffcv_dir={tmp_path / 'x'}",
                 "--workers", "1", "--max-resolution", "32"]) == 0
    assert load_betons(tmp_path / "x", "folders").meta["write"]["max_resolution"] == 32
    assert "15 train" in capsys.readouterr().out
    assert main(["data", "to-ffcv", "dataset=cifar10", f"ffcv_dir={tmp_path / 'y'}"]) == 2
