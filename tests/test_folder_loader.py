"""FolderLoader (ipsd.data.folder_loader) on a tiny class-folder dataset of real JPEGs built in tmp_path:
batch contents, pairs, views, test sharding, reproducibility across worker counts, subsets, and a one-epoch
engine run per loader kind (plain anchors and pairs)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipsd.config import ConfigError, load_run_config
from ipsd.data.datasets import subset_items
from ipsd.data.folder_loader import FolderLoader
from ipsd.data.folders import IMAGENET_MEAN, IMAGENET_STD, read_class_folders
from ipsd.engine import train
from ipsd.resolve import resolve
from ipsd.data.batch import Needs

CLASSES, TRAIN, VAL, SIDE, CROP = 3, 6, 2, 40, 24


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        for split, n in (("train", TRAIN), ("val", VAL)):
            folder = base / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                # a class-coloured image with noise, so labels are learnable and images differ
                pixels = np.full((SIDE, SIDE + 8 * i, 3), 60 + 80 * c, dtype=np.int16)
                pixels = (pixels + rng.integers(-40, 40, pixels.shape)).clip(0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img{i}.jpg", format="JPEG")
    return base


@pytest.fixture(scope="module")
def data(root):
    return read_class_folders(root)


def loader(data, needs=None, batch=6, rank=0, world=1, workers=0, seed=0):
    return FolderLoader(data, torch.device("cpu"), batch, needs or Needs(), seed, rank, world, image_size=CROP, workers=workers)


def test_batches_shapes_dtypes_labels(data):
    ld = loader(data)
    batches = list(ld.epoch(1))
    assert len(batches) == len(ld) == 3 and ld.images_per_step == 6
    seen = []
    for b in batches:
        assert b.x.shape == (6, 3, CROP, CROP) and b.x.dtype == torch.float32
        assert b.y.dtype == torch.int64 and b.index.dtype == torch.int64
        assert torch.equal(b.y, data.train_y[b.index])
        assert b.partner is None and b.view2 is None
        seen += b.index.tolist()
    assert sorted(seen) == list(range(CLASSES * TRAIN))  # one epoch visits every image once
    # normalised with the dataset's statistics: pixels were in [0, 255]
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD))
    x = torch.cat([b.x for b in batches])
    assert lo - 1e-5 <= x.min() and x.max() <= hi + 1e-5


def test_pairs_same_class_not_self(data):
    ld = loader(data, Needs(pairs=True))
    assert ld.images_per_step == 12
    for b in ld.epoch(2):
        assert b.partner.shape == b.x.shape
        assert torch.equal(data.train_y[b.partner_index], b.y)
        assert (b.partner_index != b.index).all()


def test_views_differ_and_epochs_differ(data):
    ld = loader(data, Needs(views=2))
    b = next(iter(ld.epoch(1)))
    assert b.view2.shape == b.x.shape
    assert not torch.equal(b.view2, b.x)  # two independent crops of the same images
    again = next(iter(ld.epoch(1)))
    assert torch.equal(again.x, b.x) and torch.equal(again.view2, b.view2)
    assert not torch.equal(next(iter(loader(data, Needs(views=2)).epoch(2))).x, b.x)


def test_strong_view2_runs(data):
    needs = Needs(views=2, strong_view2=True, strong_args=(("n", 2), ("magnitude", 10)))
    b = next(iter(loader(data, needs).epoch(1)))
    assert b.view2.shape == b.x.shape and torch.isfinite(b.view2).all()


def test_same_batches_whatever_the_worker_count(data):
    a = list(loader(data, Needs(pairs=True), workers=0).epoch(3))
    b = list(loader(data, Needs(pairs=True), workers=2).epoch(3))
    for u, v in zip(a, b, strict=True):
        assert torch.equal(u.index, v.index) and torch.equal(u.partner_index, v.partner_index)
        assert torch.equal(u.x, v.x) and torch.equal(u.partner, v.partner)


def test_training_process_rng_untouched(data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    list(loader(data, workers=0).epoch(1))
    list(loader(data).test_batches(4))
    assert torch.equal(torch.rand(3), expected)


def test_test_set_sharded_over_ranks(data):
    parts = [list(loader(data, rank=r, world=2).test_batches(2)) for r in range(2)]
    ys = [y for part in parts for _, y in part]
    assert sum(len(y) for y in ys) == CLASSES * VAL
    assert torch.equal(torch.cat(ys), data.test_y)  # every val image once, in order, across the 2 ranks
    for part in parts:
        for x, y in part:
            assert x.shape == (len(y), 3, CROP, CROP) and x.dtype == torch.float32
    # centre crops are deterministic
    again = list(loader(data, rank=1, world=2).test_batches(2))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(parts[1], again))


def test_ranks_split_each_step(data):
    one = list(loader(data, batch=6).epoch(1))
    two = [list(loader(data, batch=6, rank=r, world=2).epoch(1)) for r in range(2)]
    for k, b in enumerate(one):
        union = torch.cat([two[0][k].index, two[1][k].index])
        assert sorted(union.tolist()) == sorted(b.index.tolist())


def test_subset_items(data):
    sub = subset_items(data, per_class=2, classes=[2, 0], test_per_class=1)
    assert sub.classes == ["class2", "class0"]
    assert sub.train_y.tolist() == [1, 1, 0, 0] and sub.test_y.tolist() == [1, 0]
    assert [p.parent.name for p in sub.train_paths] == ["class0", "class0", "class2", "class2"]
    with pytest.raises(ValueError, match="only 6 train images"):
        subset_items(data, per_class=7)


def test_resolve_accepts_file_datasets_and_identity_keys():
    assert resolve(load_run_config(None, ["dataset=imagenet", "model=resnet18"])).cfg.dataset == "imagenet"
    with pytest.raises(ConfigError, match="on-disk datasets"):
        resolve(load_run_config(None, ["dataset=imagenett"]))
    a = resolve(load_run_config(None, ["epochs=3", "dataset=imagenet"]))
    assert a.cfg.identity()["image_size"] == 224 and "workers" not in a.cfg.identity()
    assert a.run_id == resolve(load_run_config(None, ["epochs=3", "dataset=imagenet", "workers=0"])).run_id
    assert a.run_id != resolve(load_run_config(None, ["epochs=3", "dataset=imagenet", "image_size=32"])).run_id
    # an in-memory run trains at the data's own size: image_size changes nothing there, so not its identity
    m = resolve(load_run_config(None, ["epochs=3"]))
    assert "image_size" not in m.cfg.identity()
    assert m.run_id == resolve(load_run_config(None, ["epochs=3", "image_size=32"])).run_id


@pytest.mark.parametrize("method", ["hard", "ips"])
def test_engine_trains_one_epoch(tmp_path, root, method):
    cfg = load_run_config(None, [f"method={method}", "dataset=folders", f"data_root={root}", "model=resnet8",
                                 "image_size=32", "workers=0", "epochs=1", "batch_size=6", "eval_batch_size=4",
                                 "progress=false", "device=cpu", f"out={tmp_path}", "per_class=4"])
    folder = train(cfg)
    result = json.loads((folder / "result.json").read_text())
    assert result["dataset"] == "folders" and result["final"]["epoch"] == 1
    assert result["images_per_step"] == (12 if method == "ips" else 6)
    assert 0 <= result["final"]["top1"] <= 100
