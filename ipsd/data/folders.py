"""File-list readers for image datasets too large to decode into memory (ImageNet, CUB-200, Dogs).

Each reader returns a :class:`FileDataset`: the image paths of both splits plus 0-based int64
labels and class names. Nothing is decoded here; a loader opens the files later.

Layouts
-------
* ``imagenet`` / ``folders``: ``root/train/<class>/...`` and ``root/val/<class>/...`` (``folders``
  also accepts ``root/test/<class>/...`` when there is no ``val``). Classes are the sorted train
  folder names; the evaluation split must have exactly the same class folders.
* ``cub200``: the official ``CUB_200_2011`` folder (``images.txt``, ``image_class_labels.txt``,
  ``train_test_split.txt``, ``classes.txt``, ``images/``).
* ``dogs``: the official Stanford Dogs ``Images/<breed>/`` tree with ``train_list``/``test_list``
  (see :func:`read_stanford_dogs` for the accepted list forms).

Checks are strict: every malformed line or missing file raises :class:`DataError` naming the file
(and line) and what was expected. For list-based layouts (CUB, Dogs) every listed image is checked
with one ``os.path.exists`` per file: a stat each (~0.3 s per 100k files on a warm local disk,
slower on network filesystems); nothing is opened or decoded. Folder layouts are found by listing, so they need no such check.
Order is deterministic: folders in sorted order, lists in their shipped order (CUB: by image id).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from PIL import Image
from torch import Tensor

from ipsd.data.datasets import DataError, check_labels
from ipsd.registry import Registry

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

# Same set as torchvision's ImageFolder; compared case-insensitively (ImageNet uses ``.JPEG``).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_LISTED = 5  # how many offending names an error message spells out

CUB_FOLDER = "CUB_200_2011"
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")


@dataclass
class FileDataset:
    """A split of an image dataset on disk: paths + int64 labels (+ class names)."""

    ITEMS: ClassVar[tuple[str, str]] = ("train_paths", "test_paths")  # what a subset selects (subset_items)
    name: str
    root: Path
    train_paths: list[Path]
    train_y: Tensor  # int64 (N,), 0-based
    test_paths: list[Path]
    test_y: Tensor
    classes: list[str]
    mean: tuple[float, float, float] = IMAGENET_MEAN  # of [0, 1] pixels, per channel
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Same policy as ImageData: fail at construction, not deep inside a training step.
        for split, paths, y in (("train", self.train_paths, self.train_y), ("test", self.test_paths, self.test_y)):
            check_labels(self.name, split, y, len(paths), len(self.classes))
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


FILE_DATASETS = Registry[Callable[[Path], FileDataset]]("file dataset")


def open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """One image file decoded to RGB (grey, palette and CMYK files included), the file closed again."""
    with Image.open(path) as im:
        return im.convert("RGB")


# ---------------------------------------------------------------- shared helpers


def _as_root(root: str | os.PathLike[str], what: str) -> Path:
    if root is None or str(root) == "":
        raise DataError(f"no data root given for {what}: pass the folder holding the dataset")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(f"{what} root {path} does not exist or is not a folder")
    return path


def _some(items: Iterable[Any]) -> str:
    """First MAX_LISTED items of a collection, with a count of the rest."""
    items = list(items)
    shown = ", ".join(str(i) for i in items[:MAX_LISTED])
    return shown + (f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def _labels(values: list[int]) -> Tensor:
    return torch.tensor(values, dtype=torch.int64)


def _require_exists(paths: list[Path], listed_in: str) -> None:
    """One os.path.exists per listed image; all missing ones are counted, a few named."""
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise DataError(f"{len(missing)} image(s) listed in {listed_in} are missing on disk: {_some(missing)}. "
                        f"Fix: re-extract the image archive so every listed file exists.")


def _nonempty(name: str, split: str, paths: list[Path], source: str) -> None:
    if not paths:
        raise DataError(f"{name}: the {split} split is empty (from {source})")


# ---------------------------------------------------------------- class folders (ImageNet layout)


def _is_image(entry: os.DirEntry[str]) -> bool:
    return not entry.name.startswith(".") and entry.name.lower().endswith(IMG_EXTENSIONS) and entry.is_file()


def _scan_class(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursive, hidden entries skipped), sorted by relative path."""
    found: list[str] = []
    stack = [""]
    while stack:
        rel = stack.pop()
        try:
            entries = list(os.scandir(folder / rel if rel else folder))
        except OSError as e:
            raise DataError(f"cannot list {folder / rel}: {e}") from e
        for entry in entries:
            sub = f"{rel}/{entry.name}" if rel else entry.name
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                stack.append(sub)
            elif _is_image(entry):
                found.append(sub)
    found.sort()
    return [folder / r for r in found]


def _class_dirs(split_dir: Path) -> list[str]:
    """Sorted class folder names of one split; loose images beside them are an error."""
    try:
        entries = list(os.scandir(split_dir))
    except OSError as e:
        raise DataError(f"cannot list {split_dir}: {e}") from e
    loose = sorted(e.name for e in entries if _is_image(e))
    if loose:
        raise DataError(f"{split_dir} holds {len(loose)} image file(s) directly ({_some(loose)}); expected one "
                        f"sub-folder per class ({split_dir}/<class>/<image>). For ImageNet's flat val folder, sort "
                        f"it into wnid folders first (e.g. with the standard valprep.sh script).")
    dirs = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not dirs:
        raise DataError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<image>")
    return dirs


def _read_folders(root: str | os.PathLike[str], name: str, eval_splits: tuple[str, ...]) -> FileDataset:
    base = _as_root(root, name)
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DataError(f"{name}: missing {train_dir}; expected {base}/train/<class>/<image> and "
                        f"{base}/{'|'.join(eval_splits)}/<class>/<image>")
    eval_dir = next((base / s for s in eval_splits if (base / s).is_dir()), None)
    if eval_dir is None:
        raise DataError(f"{name}: missing evaluation split: none of "
                        f"{', '.join(str(base / s) for s in eval_splits)} exists; expected <split>/<class>/<image>")
    classes = _class_dirs(train_dir)
    eval_classes = _class_dirs(eval_dir)
    extra = sorted(set(eval_classes) - set(classes))
    absent = sorted(set(classes) - set(eval_classes))
    if extra or absent:
        parts = ([f"{len(extra)} class folder(s) not in {train_dir}: {_some(extra)}"] if extra else []) + \
                ([f"no folder for {len(absent)} train class(es): {_some(absent)}"] if absent else [])
        raise DataError(f"{name}: {eval_dir} must have the same class folders as {train_dir}; it has "
                        + "; ".join(parts))
    splits: dict[str, tuple[list[Path], list[int]]] = {}
    for split_dir in (train_dir, eval_dir):
        paths: list[Path] = []
        labels: list[int] = []
        for label, cls in enumerate(classes):
            files = _scan_class(split_dir / cls)
            if not files:
                raise DataError(f"{name}: class folder {split_dir / cls} has no images "
                                f"(looked for {', '.join(IMG_EXTENSIONS)}, any case)")
            paths += files
            labels += [label] * len(files)
        splits[split_dir.name] = (paths, labels)
    (tr_p, tr_y), (te_p, te_y) = splits[train_dir.name], splits[eval_dir.name]
    return FileDataset(name=name, root=base, train_paths=tr_p, train_y=_labels(tr_y),
                       test_paths=te_p, test_y=_labels(te_y), classes=classes)


@FILE_DATASETS.register("folders")
def read_class_folders(root: str | os.PathLike[str], name: str = "folders") -> FileDataset:
    """Generic ``root/train/<class>/*`` + ``root/val/<class>/*`` (or ``root/test/<class>/*`` when there
    is no ``val``) layout. Classes are the sorted train folder names and labels index them; the
    evaluation split must have the same class folders. Images are found recursively under each
    class folder by extension (IMG_EXTENSIONS, any case); hidden files/folders and other files are
    ignored; order is class, then relative path."""
    return _read_folders(root, name, ("val", "test"))


@FILE_DATASETS.register("imagenet")
def read_imagenet(root: str | os.PathLike[str]) -> FileDataset:
    """ImageNet in the usual layout: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``.

    :func:`read_class_folders` with the name ``imagenet``, requiring ``val``. The flat val folder as
    shipped (50k JPEGs in one folder) is rejected with a hint to sort it into wnid folders."""
    return _read_folders(root, "imagenet", ("val",))


# ---------------------------------------------------------------- text-list helpers (CUB)


def _read_lines(path: Path, expected: str) -> list[tuple[int, str]]:
    """Non-blank lines of a text file with their 1-based numbers."""
    if not path.is_file():
        raise DataError(f"missing {path}; expected a text file of lines '{expected}'")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as UTF-8 text ({e}); expected lines '{expected}'") from e
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _bad_line(path: Path, n: int, line: str, expected: str, why: str = "") -> DataError:
    return DataError(f"{path}: line {n} {why or 'is malformed'}: {line!r}; expected '{expected}'")


def _parse_int(text: str, path: Path, n: int, line: str, expected: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise _bad_line(path, n, line, expected, f"has a non-integer {what}") from None


def _id_table(path: Path, expected: str, value_is_int: bool) -> dict[int, Any]:
    """``<id> <value>`` lines -> {id: value} (value an int or the rest of the line); ids unique."""
    table: dict[int, Any] = {}
    for n, line in _read_lines(path, expected):
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or (value_is_int and len(parts[1].split()) != 1):
            raise _bad_line(path, n, line, expected, "does not have the expected fields")
        key = _parse_int(parts[0], path, n, line, expected, "id")
        if key in table:
            raise _bad_line(path, n, line, expected, f"repeats id {key}")
        table[key] = _parse_int(parts[1], path, n, line, expected, "value") if value_is_int else parts[1]
    if not table:
        raise DataError(f"{path} is empty; expected lines '{expected}'")
    return table


def _same_ids(a: tuple[Path, dict[int, Any]], b: tuple[Path, dict[int, Any]]) -> None:
    only_a = sorted(set(a[1]) - set(b[1]))
    only_b = sorted(set(b[1]) - set(a[1]))
    if only_a or only_b:
        msg = ([f"{len(only_a)} id(s) in {a[0]} are missing from {b[0]}: {_some(only_a)}"] if only_a else []) + \
              ([f"{len(only_b)} id(s) in {b[0]} are missing from {a[0]}: {_some(only_b)}"] if only_b else [])
        raise DataError("CUB-200 lists disagree: " + "; ".join(msg) + ". Fix: re-extract CUB_200_2011.tgz.")


@FILE_DATASETS.register("cub200")
def read_cub200(root: str | os.PathLike[str]) -> FileDataset:
    """CUB-200-2011 in the official layout; ``root`` is the folder holding ``CUB_200_2011/`` or that folder.

    Files: ``images.txt`` (``<id> <relpath under images/>``), ``image_class_labels.txt``
    (``<id> <class 1..K>``), ``train_test_split.txt`` (``<id> <1=train|0=test>``), ``classes.txt``
    (``<class 1..K> <name>``; ids must be exactly 1..K) and ``images/<relpath>``. The three per-image
    files must list the same ids. Images are ordered by id; labels are class id - 1."""
    base = _as_root(root, "cub200")
    folder = base / CUB_FOLDER if (base / CUB_FOLDER).is_dir() else base
    for f in CUB_FILES:
        if not (folder / f).is_file():
            raise DataError(f"cub200: missing {folder / f}. Fix: pass the folder holding {CUB_FOLDER}/ "
                            f"(or {CUB_FOLDER} itself) as extracted from CUB_200_2011.tgz, which has "
                            f"{', '.join(CUB_FILES)} and images/")
    images_txt, labels_txt, split_txt, classes_txt = (folder / f for f in CUB_FILES)
    images = _id_table(images_txt, "<image id> <relative path under images/>", value_is_int=False)
    labels = _id_table(labels_txt, "<image id> <class id 1..K>", value_is_int=True)
    split = _id_table(split_txt, "<image id> <1 for train | 0 for test>", value_is_int=True)
    class_names = _id_table(classes_txt, "<class id 1..K> <class name>", value_is_int=False)

    k = len(class_names)
    if sorted(class_names) != list(range(1, k + 1)):
        raise DataError(f"{classes_txt}: class ids must be exactly 1..{k}, got {_some(sorted(class_names))}")
    _same_ids((images_txt, images), (labels_txt, labels))
    _same_ids((images_txt, images), (split_txt, split))
    bad_label = sorted(i for i, c in labels.items() if not 1 <= c <= k)
    if bad_label:
        raise DataError(f"{labels_txt}: image id(s) {_some(bad_label)} have a class outside 1..{k} "
                        f"(the ids in {classes_txt})")
    bad_split = sorted(i for i, s in split.items() if s not in (0, 1))
    if bad_split:
        raise DataError(f"{split_txt}: image id(s) {_some(bad_split)} have a split other than 1 (train) or 0 (test)")

    out: dict[int, tuple[list[Path], list[int]]] = {1: ([], []), 0: ([], [])}
    for i in sorted(images):
        paths, ys = out[split[i]]
        paths.append(folder / "images" / images[i])
        ys.append(labels[i] - 1)
    for s, split_name in ((1, "train"), (0, "test")):
        _nonempty("cub200", split_name, out[s][0], str(split_txt))
    _require_exists(out[1][0] + out[0][0], str(images_txt))
    return FileDataset(name="cub200", root=folder, train_paths=out[1][0], train_y=_labels(out[1][1]),
                       test_paths=out[0][0], test_y=_labels(out[0][1]),
                       classes=[class_names[c] for c in range(1, k + 1)])


# ---------------------------------------------------------------- Stanford Dogs

DOGS_TEXT_FORM = "<path under Images/> <label 1..K>"


def _find_dogs_lists(base: Path) -> tuple[str, Path, Path]:
    """(form, train list, test list): a complete ``.mat`` pair wins over a ``.txt`` pair; root, then lists/."""
    dirs = (base, base / "lists")
    pairs = {ext: next(((d / f"train_list.{ext}", d / f"test_list.{ext}") for d in dirs
                        if (d / f"train_list.{ext}").is_file() and (d / f"test_list.{ext}").is_file()), None)
             for ext in ("mat", "txt")}
    if pairs["mat"] is not None:
        try:
            import scipy.io  # noqa: F401
        except ImportError:
            if pairs["txt"] is None:
                raise DataError(f"dogs: reading {pairs['mat'][0]} and {pairs['mat'][1]} needs scipy, which is not "
                                f"installed. Fix: pip install scipy (or provide train_list.txt/test_list.txt "
                                f"with lines '{DOGS_TEXT_FORM}').") from None
        else:
            return ("mat", *pairs["mat"])
    if pairs["txt"] is not None:
        return ("txt", *pairs["txt"])
    halves = [str(d / f"{s}_list.{e}") for d in dirs for e in ("mat", "txt") for s in ("train", "test")
              if (d / f"{s}_list.{e}").is_file()]
    found = f" (found only {', '.join(halves)}: the other list of the pair is missing)" if halves else ""
    raise DataError(f"dogs: no train/test lists in {base} or {base / 'lists'}{found}. Expected train_list.mat and "
                    f"test_list.mat as shipped in lists.tar, or train_list.txt and test_list.txt with lines "
                    f"'{DOGS_TEXT_FORM}'.")


def _unwrap_str(value: Any) -> str | None:
    """A MATLAB cell entry (nested 1-element arrays around a string) -> the string."""
    while not isinstance(value, (str, bytes)):
        try:
            if len(value) != 1:
                return None
            value = value[0]
        except TypeError:
            return None
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _read_mat_list(path: Path) -> list[tuple[str, int]]:
    import numpy as np
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path))
    except Exception as e:  # malformed or MATLAB v7.3 (HDF5) files
        raise DataError(f"{path}: cannot be read by scipy.io.loadmat ({type(e).__name__}: {e}); expected the "
                        f"Stanford Dogs list as shipped in lists.tar") from e
    if "file_list" not in mat or "labels" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DataError(f"{path}: expected keys 'file_list' and 'labels', has {keys}")
    files = np.asarray(mat["file_list"], dtype=object).ravel()
    labels = np.asarray(mat["labels"]).ravel()
    if files.shape != labels.shape:
        raise DataError(f"{path}: 'file_list' has {files.size} entries but 'labels' has {labels.size}")
    out: list[tuple[str, int]] = []
    for i, (f, y) in enumerate(zip(files, labels)):
        rel = _unwrap_str(f)
        if rel is None or not rel.strip():
            raise DataError(f"{path}: file_list entry {i} is not a path string: {f!r}")
        try:
            label = int(y)
            ok = float(y) == label
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise DataError(f"{path}: labels entry {i} ({y!r}) for {rel} is not an integer")
        out.append((rel.strip(), label))
    return out


def _read_text_list(path: Path) -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    for n, line in _read_lines(path, DOGS_TEXT_FORM):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise _bad_line(path, n, line, DOGS_TEXT_FORM, "does not have the expected fields")
        out.append((parts[0], _parse_int(parts[1], path, n, line, DOGS_TEXT_FORM, "label")))
    return out


@FILE_DATASETS.register("dogs")
def read_stanford_dogs(root: str | os.PathLike[str]) -> FileDataset:
    """Stanford Dogs in the official layout: ``root/Images/<breed>/*.jpg`` plus a train and a test list.

    Supported list forms, looked for in ``root`` and then ``root/lists``:

    * ``train_list.mat`` + ``test_list.mat`` as shipped in ``lists.tar`` (read with
      ``scipy.io.loadmat``; keys ``file_list``, paths relative to ``Images/``, and ``labels``, 1-based).
      Preferred whenever both are present; they need scipy.
    * ``train_list.txt`` + ``test_list.txt``: one image per line, ``<path under Images/> <label 1..K>``
      (whitespace-separated, the label last; blank lines ignored). Used when there is no ``.mat``
      pair, or when scipy is not installed.

    Labels become 0-based (label - 1). Each label must be used by exactly one breed folder, and that
    folder name (e.g. ``n02085620-Chihuahua``) is the class name; every label 1..K (K = the largest)
    must occur. An image may not appear twice, nor in both lists. Order is the lists' order."""
    base = _as_root(root, "dogs")
    images_dir = base / "Images"
    if not images_dir.is_dir():
        raise DataError(f"dogs: missing {images_dir}; expected root to hold Images/<breed>/*.jpg "
                        f"(extracted from Images.tar) and the train/test lists (lists.tar)")
    form, train_list, test_list = _find_dogs_lists(base)
    read = _read_mat_list if form == "mat" else _read_text_list
    entries = {"train": (train_list, read(train_list)), "test": (test_list, read(test_list))}

    folder_of: dict[int, tuple[str, Path]] = {}
    label_of: dict[str, tuple[int, Path]] = {}
    seen: dict[str, Path] = {}
    for path, items in entries.values():
        if not items:
            raise DataError(f"{path} lists no images; expected entries '{DOGS_TEXT_FORM}'")
        for rel, label in items:
            if label < 1:
                raise DataError(f"{path}: {rel} has label {label}; expected labels 1..K (1-based)")
            if rel in seen:
                where = "twice in" if seen[rel] == path else f"in both {seen[rel]} and"
                raise DataError(f"{path}: {rel} is listed {where} {path}; each image must be listed once")
            seen[rel] = path
            breed = rel.replace("\\", "/").split("/")[0]
            if breed == rel:
                raise DataError(f"{path}: {rel} has no breed folder; expected '<breed>/<file>' under {images_dir}")
            if label in folder_of and folder_of[label][0] != breed:
                raise DataError(f"{path}: label {label} is used for both {folder_of[label][0]}/ and {breed}/ "
                                f"(e.g. {rel}); each label must name one breed folder")
            if breed in label_of and label_of[breed][0] != label:
                raise DataError(f"{path}: {breed}/ has labels {label_of[breed][0]} and {label} (e.g. {rel})")
            folder_of[label] = (breed, path)
            label_of[breed] = (label, path)
    k = max(folder_of)
    unused = [c for c in range(1, k + 1) if c not in folder_of]
    if unused:
        raise DataError(f"dogs: labels {_some(unused)} (of 1..{k}) are used by no image in {train_list} or "
                        f"{test_list}, so they have no breed folder / class name")

    split: dict[str, tuple[list[Path], list[int]]] = {}
    for name, (path, items) in entries.items():
        split[name] = ([images_dir / rel for rel, _ in items], [label - 1 for _, label in items])
        _require_exists(split[name][0], str(path))
    return FileDataset(name="dogs", root=base, train_paths=split["train"][0], train_y=_labels(split["train"][1]),
                       test_paths=split["test"][0], test_y=_labels(split["test"][1]),
                       classes=[folder_of[c][0] for c in range(1, k + 1)])
