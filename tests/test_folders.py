"""File-list readers (ipsd.data.folders) on tiny real-JPEG datasets built in tmp_path:
an ImageNet-style folder tree, a miniature CUB_200_2011 and a miniature Stanford Dogs layout."""
from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ipsd.data import DataError
from ipsd.data.folders import (
    FILE_DATASETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    FileDataset,
    read_class_folders,
    read_cub200,
    read_imagenet,
    read_stanford_dogs,
)

scipy_io = pytest.importorskip("scipy.io")


def write_jpeg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


@contextmanager
def raises_naming(path: Path | str, *words: str) -> Iterator[pytest.ExceptionInfo[DataError]]:
    """Expect a DataError whose message names ``path`` and contains every one of ``words``."""
    with pytest.raises(DataError) as info:
        yield info
    msg = str(info.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, (w, msg)


# ---------------------------------------------------------------- ImageNet-style folders

WNIDS = ["n01440764", "n01443537", "n02085620"]


def make_imagenet(root: Path, train: int = 3, val: int = 2) -> Path:
    seed = 0
    for split, n in (("train", train), ("val", val)):
        for wnid in WNIDS:
            for i in range(n):
                write_jpeg(root / split / wnid / f"{wnid}_{i}.JPEG", seed := seed + 1)
    return root


@pytest.fixture
def imagenet(tmp_path: Path) -> Path:
    return make_imagenet(tmp_path / "imagenet")


def test_imagenet_counts_labels_order(imagenet: Path) -> None:
    (imagenet / "train" / WNIDS[0] / ".DS_Store").write_text("x")  # hidden and non-image files are ignored
    (imagenet / "train" / WNIDS[0] / "readme.txt").write_text("x")
    write_jpeg(imagenet / "train" / WNIDS[2] / "extra" / "nested.jpg", 99)  # nested, lower-case extension

    ds = read_imagenet(imagenet)
    assert isinstance(ds, FileDataset) and ds.name == "imagenet" and ds.root == imagenet
    assert ds.classes == WNIDS and ds.num_classes == 3
    assert (ds.mean, ds.std) == (IMAGENET_MEAN, IMAGENET_STD)
    assert ds.train_y.dtype == torch.int64 and ds.test_y.dtype == torch.int64
    assert ds.train_y.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.train_paths[:3] == [imagenet / "train" / WNIDS[0] / f"{WNIDS[0]}_{i}.JPEG" for i in range(3)]
    # within a class: sorted by path relative to the class folder ("extra/..." < "n0...")
    assert ds.train_paths[6:] == [imagenet / "train" / WNIDS[2] / "extra" / "nested.jpg"] + [
        imagenet / "train" / WNIDS[2] / f"{WNIDS[2]}_{i}.JPEG" for i in range(3)]
    assert all(imagenet / "train" in p.parents for p in ds.train_paths)
    assert all(p.parent == imagenet / "val" / ds.classes[y] for p, y in zip(ds.test_paths, ds.test_y.tolist()))
    assert all(p.is_file() for p in ds.train_paths + ds.test_paths)
    # deterministic: a second read gives the same lists
    again = read_imagenet(str(imagenet))
    assert again.train_paths == ds.train_paths and torch.equal(again.train_y, ds.train_y)


def test_class_folders_generic_and_registry(tmp_path: Path, imagenet: Path) -> None:
    generic = tmp_path / "generic"
    shutil.copytree(imagenet / "train", generic / "train")
    shutil.copytree(imagenet / "val", generic / "test")  # "test" works when there is no "val"
    ds = read_class_folders(generic, "mine")
    assert ds.name == "mine" and ds.classes == WNIDS and len(ds.test_paths) == 6
    assert all(p.parts[-3] == "test" for p in ds.test_paths)
    with raises_naming(generic / "val", "missing"):  # imagenet needs val/
        read_imagenet(generic)
    assert FILE_DATASETS.names() == ["cub200", "dogs", "folders", "imagenet"]
    assert FILE_DATASETS.get("folders")(imagenet).name == "folders"
    assert FILE_DATASETS.get("imagenet") is read_imagenet


def test_imagenet_val_class_not_in_train(imagenet: Path) -> None:
    write_jpeg(imagenet / "val" / "n09999999" / "x.JPEG", 5)
    with raises_naming(imagenet / "val", "n09999999", str(imagenet / "train")):
        read_imagenet(imagenet)


def test_imagenet_val_missing_a_class(imagenet: Path) -> None:
    shutil.rmtree(imagenet / "val" / WNIDS[1])
    with raises_naming(imagenet / "val", WNIDS[1]):
        read_imagenet(imagenet)


def test_imagenet_flat_val_and_empty_class(imagenet: Path) -> None:
    write_jpeg(imagenet / "val" / "ILSVRC2012_val_00000001.JPEG", 7)
    with raises_naming(imagenet / "val", "ILSVRC2012_val_00000001.JPEG", "valprep"):
        read_imagenet(imagenet)
    (imagenet / "val" / "ILSVRC2012_val_00000001.JPEG").unlink()
    for f in (imagenet / "train" / WNIDS[1]).iterdir():
        f.unlink()
    with raises_naming(imagenet / "train" / WNIDS[1], "no images"):
        read_imagenet(imagenet)


def test_imagenet_missing_root_and_train(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "nowhere", "does not exist"):
        read_imagenet(tmp_path / "nowhere")
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with raises_naming(tmp_path / "empty" / "train", "missing"):
        read_imagenet(tmp_path / "empty")


# ---------------------------------------------------------------- CUB-200-2011

CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
# (id, class id 1-based, is_train); listed out of id order in images.txt to check the id sort
CUB_IMAGES = [(1, 1, 1), (2, 1, 0), (3, 2, 1), (4, 2, 0), (5, 3, 1), (6, 3, 0)]


def cub_rel(i: int, c: int) -> str:
    return f"{CUB_CLASSES[c - 1]}/{CUB_CLASSES[c - 1][4:]}_{i:04d}.jpg"


def make_cub(parent: Path) -> Path:
    folder = parent / "CUB_200_2011"
    for i, c, _ in CUB_IMAGES:
        write_jpeg(folder / "images" / cub_rel(i, c), i)
    order = [3, 1, 2, 6, 5, 4]
    by_id = {i: (c, t) for i, c, t in CUB_IMAGES}
    (folder / "images.txt").write_text("".join(f"{i} {cub_rel(i, by_id[i][0])}\n" for i in order))
    (folder / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, c, _ in CUB_IMAGES))
    (folder / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t in CUB_IMAGES))
    (folder / "classes.txt").write_text("".join(f"{k} {n}\n" for k, n in enumerate(CUB_CLASSES, 1)))
    return folder


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    return make_cub(tmp_path)


def test_cub_reads_official_layout(cub: Path) -> None:
    for root in (cub.parent, cub):  # parent of CUB_200_2011 or the folder itself
        ds = read_cub200(root)
        assert ds.name == "cub200" and ds.root == cub and ds.classes == CUB_CLASSES
        assert ds.train_paths == [cub / "images" / cub_rel(i, c) for i, c in ((1, 1), (3, 2), (5, 3))]
        assert ds.test_paths == [cub / "images" / cub_rel(i, c) for i, c in ((2, 1), (4, 2), (6, 3))]
        assert ds.train_y.tolist() == [0, 1, 2] and ds.test_y.tolist() == [0, 1, 2]
        assert ds.train_y.dtype == torch.int64
    assert FILE_DATASETS.get("cub200") is read_cub200


@pytest.mark.parametrize("name", ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"])
def test_cub_missing_file(cub: Path, name: str) -> None:
    (cub / name).unlink()
    with raises_naming(cub / name, "missing"):
        read_cub200(cub.parent)


@pytest.mark.parametrize("name, line, words", [
    ("image_class_labels.txt", "3 two", ["line 3", "non-integer"]),
    ("image_class_labels.txt", "3 2 7", ["line 3", "fields"]),
    ("train_test_split.txt", "3", ["line 3", "fields"]),
    ("images.txt", "x 001.Black_footed_Albatross/a.jpg", ["line 3", "non-integer id"]),
    ("classes.txt", "1 duplicate", ["line 3", "repeats id 1"]),
])
def test_cub_bad_line(cub: Path, name: str, line: str, words: list[str]) -> None:
    path = cub / name
    lines = path.read_text().splitlines()
    lines[2] = line
    path.write_text("\n".join(lines) + "\n")
    with raises_naming(path, *words):
        read_cub200(cub)


def test_cub_id_mismatch(cub: Path) -> None:
    path = cub / "image_class_labels.txt"
    path.write_text(path.read_text().replace("6 3\n", "7 3\n"))
    with raises_naming(path, str(cub / "images.txt"), "6", "7"):
        read_cub200(cub)


def test_cub_bad_values(cub: Path) -> None:
    split = cub / "train_test_split.txt"
    split.write_text(split.read_text().replace("4 0\n", "4 2\n"))
    with raises_naming(split, "4"):
        read_cub200(cub)
    split.write_text(split.read_text().replace("4 2\n", "4 0\n"))
    labels = cub / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("6 3\n", "6 4\n"))
    with raises_naming(labels, "outside 1..3"):
        read_cub200(cub)


def test_cub_missing_image(cub: Path) -> None:
    gone = cub / "images" / cub_rel(4, 2)
    gone.unlink()
    with raises_naming(gone, str(cub / "images.txt"), "1 image(s)"):
        read_cub200(cub)


def test_cub_missing_folder(tmp_path: Path) -> None:
    with raises_naming(tmp_path / "images.txt", "CUB_200_2011"):
        read_cub200(tmp_path)


# ---------------------------------------------------------------- Stanford Dogs

BREEDS = ["n02085620-Chihuahua", "n02085782-Japanese_spaniel", "n02085936-Maltese_dog"]
# list order as shipped: grouped by breed; labels 1-based
DOGS_TRAIN = [(f"{b}/{b[:9]}_{i}.jpg", k) for k, b in enumerate(BREEDS, 1) for i in (1, 2)]
DOGS_TEST = [(f"{b}/{b[:9]}_{i}.jpg", k) for k, b in enumerate(BREEDS, 1) for i in (3,)]


def save_mat(path: Path, items: list[tuple[str, int]]) -> None:
    """Shaped like the shipped lists: file_list (N, 1) cell of 1-element string arrays, labels (N, 1) double."""
    files = np.empty((len(items), 1), dtype=object)
    for j, (rel, _) in enumerate(items):
        files[j, 0] = np.array([rel])
    labels = np.array([[float(y)] for _, y in items])
    scipy_io.savemat(str(path), {"file_list": files, "annotation_list": files, "labels": labels})


def save_txt(path: Path, items: list[tuple[str, int]]) -> None:
    path.write_text("".join(f"{rel} {y}\n" for rel, y in items))


def make_dogs(root: Path, mat: bool = True, txt: bool = False, lists_dir: str = "") -> Path:
    for seed, (rel, _) in enumerate(DOGS_TRAIN + DOGS_TEST):
        write_jpeg(root / "Images" / rel, seed)
    where = root / lists_dir
    where.mkdir(parents=True, exist_ok=True)
    for split, items in (("train", DOGS_TRAIN), ("test", DOGS_TEST)):
        if mat:
            save_mat(where / f"{split}_list.mat", items)
        if txt:
            save_txt(where / f"{split}_list.txt", items)
    return root


def check_dogs(ds: FileDataset, root: Path) -> None:
    assert ds.name == "dogs" and ds.classes == BREEDS and ds.num_classes == 3
    assert ds.train_paths == [root / "Images" / rel for rel, _ in DOGS_TRAIN]
    assert ds.test_paths == [root / "Images" / rel for rel, _ in DOGS_TEST]
    assert ds.train_y.tolist() == [0, 0, 1, 1, 2, 2] and ds.test_y.tolist() == [0, 1, 2]
    assert ds.train_y.dtype == torch.int64 and not set(ds.train_paths) & set(ds.test_paths)


@pytest.mark.parametrize("mat, txt, lists_dir", [(True, False, ""), (False, True, ""), (True, False, "lists"),
                                                 (False, True, "lists")])
def test_dogs_forms(tmp_path: Path, mat: bool, txt: bool, lists_dir: str) -> None:
    root = make_dogs(tmp_path / "dogs", mat=mat, txt=txt, lists_dir=lists_dir)
    check_dogs(read_stanford_dogs(root), root)
    assert FILE_DATASETS.get("dogs") is read_stanford_dogs


def test_dogs_prefers_mat(tmp_path: Path) -> None:
    root = make_dogs(tmp_path / "dogs", mat=True, txt=True)
    (root / "train_list.txt").write_text("garbage that would fail\n")
    check_dogs(read_stanford_dogs(root), root)


def test_dogs_without_scipy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_dogs(tmp_path / "dogs", mat=True)
    monkeypatch.setitem(sys.modules, "scipy", None)  # makes `import scipy.io` raise ImportError
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with raises_naming(root / "train_list.mat", "pip install scipy"):
        read_stanford_dogs(root)
    save_txt(root / "train_list.txt", DOGS_TRAIN)  # with the text lists too, those are used
    save_txt(root / "test_list.txt", DOGS_TEST)
    check_dogs(read_stanford_dogs(root), root)


def test_dogs_missing_lists_and_images_dir(tmp_path: Path) -> None:
    root = make_dogs(tmp_path / "dogs", mat=True)
    (root / "test_list.mat").unlink()
    with raises_naming(root / "train_list.mat", "test_list.mat", "missing"):
        read_stanford_dogs(root)
    shutil.rmtree(root / "Images")
    with raises_naming(root / "Images", "missing"):
        read_stanford_dogs(root)


def test_dogs_bad_text_line(tmp_path: Path) -> None:
    root = make_dogs(tmp_path / "dogs", mat=False, txt=True)
    path = root / "train_list.txt"
    lines = path.read_text().splitlines()
    lines[1] = f"{DOGS_TRAIN[1][0]} one"
    path.write_text("\n".join(lines) + "\n")
    with raises_naming(path, "line 2", "non-integer label"):
        read_stanford_dogs(root)
    lines[1] = DOGS_TRAIN[1][0]
    path.write_text("\n".join(lines) + "\n")
    with raises_naming(path, "line 2", "fields"):
        read_stanford_dogs(root)


def test_dogs_bad_mat(tmp_path: Path) -> None:
    root = make_dogs(tmp_path / "dogs", mat=True)
    path = root / "test_list.mat"
    path.write_bytes(b"not a mat file at all")
    with raises_naming(path, "loadmat"):
        read_stanford_dogs(root)
    scipy_io.savemat(str(path), {"files": np.zeros(3)})
    with raises_naming(path, "file_list"):
        read_stanford_dogs(root)


@pytest.mark.parametrize("train, words", [
    ([(r, 2) for r, _ in DOGS_TRAIN[:4]] + DOGS_TRAIN[4:], ["label 2 is used for both", BREEDS[0], BREEDS[1]]),
    ([(DOGS_TRAIN[0][0], 2)] + DOGS_TRAIN[1:], [f"{BREEDS[0]}/ has labels 2 and 1"]),  # one folder, two labels
    (DOGS_TRAIN[:-1] + [(DOGS_TEST[0][0], 1)], ["listed in both", DOGS_TEST[0][0]]),  # train/test overlap
    ([(DOGS_TRAIN[0][0], 0)] + DOGS_TRAIN[1:], ["label 0", "1-based"]),
])
def test_dogs_inconsistent_lists(tmp_path: Path, train: list[tuple[str, int]], words: list[str]) -> None:
    root = make_dogs(tmp_path / "dogs", mat=False, txt=True)
    save_txt(root / "train_list.txt", train)
    with pytest.raises(DataError) as info:
        read_stanford_dogs(root)
    msg = str(info.value)
    assert "_list.txt" in msg and all(w in msg for w in words), msg


def test_dogs_label_gap(tmp_path: Path) -> None:
    root = make_dogs(tmp_path / "dogs", mat=True)
    save_mat(root / "train_list.mat", [(r, 4 if y == 3 else y) for r, y in DOGS_TRAIN])
    save_mat(root / "test_list.mat", [(r, 4 if y == 3 else y) for r, y in DOGS_TEST])
    with raises_naming(root / "train_list.mat", "labels 3"):
        read_stanford_dogs(root)


def test_dogs_missing_image(tmp_path: Path) -> None:
    root = make_dogs(tmp_path / "dogs", mat=True)
    gone = root / "Images" / DOGS_TEST[1][0]
    gone.unlink()
    with raises_naming(gone, str(root / "test_list.mat")):
        read_stanford_dogs(root)
