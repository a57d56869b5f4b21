"""CIFAR-10/100 readers for the python-pickle layout, verified before a byte is unpickled.

Files are read straight into uint8 (N, 3, 32, 32) tensors with one numpy reshape per file.
Verification: a ``SHA256SUMS`` manifest beside the files wins (locally rebuilt copies cannot
match the official hashes); otherwise each file must match torchvision's official MD5.
No result cache: SHA-256 of the whole CIFAR-10 folder takes ~0.15 s here, so re-hashing on
every run is cheaper than the staleness risk of a cache.
"""
from __future__ import annotations

import codecs
import hashlib
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ipsd.data.datasets import DATASETS, ENV_DATA, DataError, ImageData, resolve_root

MANIFEST = "SHA256SUMS"
CHUNK = 1 << 20

CIFAR10_MD5: dict[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
CIFAR100_MD5: dict[str, str] = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}


@dataclass(frozen=True)
class CifarSpec:
    """Everything that differs between CIFAR-10 and CIFAR-100."""

    name: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    num_classes: int
    md5: Mapping[str, str]  # shared with the module-level table so tests can patch it
    url: str
    torchvision_class: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


CIFAR10 = CifarSpec(
    name="cifar10", folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
    meta_file="batches.meta", label_key="labels", names_key="label_names", num_classes=10,
    md5=CIFAR10_MD5, url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    torchvision_class="CIFAR10",
    mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarSpec(
    name="cifar100", folder="cifar-100-python",
    train_files=("train",), test_files=("test",),
    meta_file="meta", label_key="fine_labels", names_key="fine_label_names", num_classes=100,
    md5=CIFAR100_MD5, url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    torchvision_class="CIFAR100",
    mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761),
)


def _fix_hint(spec: CifarSpec) -> str:
    return (f"re-download with download=true, or set data_root / {ENV_DATA} to the folder "
            f"containing {spec.folder} (a good copy)")


def find_folder(root: Path, spec: CifarSpec) -> Path:
    """Accept the torchvision-style parent folder or the ``cifar-*`` folder itself."""
    if (root / spec.folder).is_dir():
        return root / spec.folder
    if root.name == spec.folder or any((root / f).exists() for f in (*spec.files, MANIFEST)):
        return root
    return root / spec.folder


def file_digest(path: Path, algorithm: str) -> str:
    """Hex digest of a file, streamed in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path) -> dict[str, str]:
    """Parse ``sha256sum`` output: ``<64 hex>  <name>`` (or `` *<name>`` for binary mode)."""
    sums: dict[str, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        digest, _, name = line.partition(" ")
        name = name.lstrip(" ").removeprefix("*").strip()
        if len(digest) != 64 or not name or any(c not in "0123456789abcdefABCDEF" for c in digest):
            raise DataError(f"{path}: line {n} is not in sha256sum format ('<sha256>  <file>'): {line!r}")
        sums[Path(name).name] = digest.lower()
    return sums


def _check_file(folder: Path, name: str, expected: str | None, algorithm: str) -> str | None:
    """One problem line for ``name``, or None when it is present and matches."""
    path = folder / name
    if not path.is_file():
        return f"{name}: missing (expected {path})"
    if expected is None:
        return f"{name}: not listed in {folder / MANIFEST}"
    try:
        got = file_digest(path, algorithm)
    except OSError as e:
        return f"{name}: unreadable ({e})"
    if got != expected.lower():
        return (f"{name}: {algorithm} mismatch (expected {expected}, got {got}; "
                f"{path.stat().st_size} bytes) - truncated or corrupted")
    return None


def verify(folder: Path, spec: CifarSpec) -> None:
    """Raise DataError listing every needed file that is missing, unlisted or mismatching."""
    manifest = folder / MANIFEST
    expected: Mapping[str, str]
    if manifest.is_file():
        expected, algorithm, source = read_manifest(manifest), "sha256", f"manifest {manifest}"
    else:
        expected, algorithm, source = spec.md5, "md5", "official MD5 (no SHA256SUMS beside the files)"
    problems = [p for name in spec.files if (p := _check_file(folder, name, expected.get(name), algorithm))]
    if problems:
        raise DataError(f"{spec.name} in {folder} failed verification against {source}:\n  "
                        + "\n  ".join(problems) + f"\nFix: {_fix_hint(spec)}.")


def _numpy_attr(name: str) -> Any:
    """``numpy._core.multiarray.<name>`` (numpy 2) or ``numpy.core.multiarray.<name>`` (numpy 1)."""
    try:
        from numpy._core import multiarray
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, name)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and plain containers: a data file is not code."""

    _ALLOWED: dict[tuple[str, str], Any] = {
        **{(m, n): (lambda n=n: _numpy_attr(n))
           for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")},
        ("numpy", "ndarray"): lambda: np.ndarray,
        ("numpy", "dtype"): lambda: np.dtype,
        ("_codecs", "encode"): lambda: codecs.encode,
    }

    def find_class(self, module: str, name: str) -> Any:
        make = self._ALLOWED.get((module, name))
        if make is None:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return make()


def unpickle(path: Path, spec: CifarSpec) -> dict[str, Any]:
    """Load one CIFAR pickle (Python-2 style) as a dict with str keys."""
    try:
        with open(path, "rb") as f:  # a real file lets pickle read big buffers in place (~10x BytesIO)
            obj = _ArrayUnpickler(f, encoding="bytes").load()
    except Exception as e:
        raise DataError(f"{path}: cannot be unpickled as a {spec.name} file ({e}). Fix: {_fix_hint(spec)}.") from e
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict, got {type(obj).__name__}. Fix: {_fix_hint(spec)}.")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def read_batch(path: Path, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 of one batch file."""
    d = unpickle(path, spec)
    if "data" not in d or spec.label_key not in d:
        raise DataError(f"{path}: missing key 'data' or {spec.label_key!r} (has {sorted(d)}). Fix: {_fix_hint(spec)}.")
    data = np.asarray(d["data"])
    labels = np.asarray(d[spec.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != data.shape[:1]:
        raise DataError(f"{path}: expected uint8 data (N, 3072) and N labels, got {data.dtype} {data.shape} "
                        f"and {labels.size} labels. Fix: {_fix_hint(spec)}.")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"{path}: labels outside 0..{spec.num_classes - 1}. Fix: {_fix_hint(spec)}.")
    return data.reshape(-1, 3, 32, 32), labels


def read_split(folder: Path, files: tuple[str, ...], spec: CifarSpec) -> tuple[torch.Tensor, torch.Tensor]:
    parts = [read_batch(folder / f, spec) for f in files]
    x = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    y = np.concatenate([p[1] for p in parts])
    return torch.from_numpy(x), torch.from_numpy(y)


def read_classes(folder: Path, spec: CifarSpec) -> list[str]:
    path = folder / spec.meta_file
    names = unpickle(path, spec).get(spec.names_key)
    if not isinstance(names, list) or len(names) != spec.num_classes:
        raise DataError(f"{path}: expected {spec.num_classes} names under {spec.names_key!r}. Fix: {_fix_hint(spec)}.")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def fetch(spec: CifarSpec, dest: Path) -> None:
    """Download and extract via torchvision; any failure becomes a DataError with a manual route."""
    try:
        import torchvision.datasets as tvd

        getattr(tvd, spec.torchvision_class)(str(dest), train=True, download=True)
    except Exception as e:
        raise DataError(
            f"could not download {spec.name} from {spec.url} into {dest} ({type(e).__name__}: {e}). "
            f"If this machine is offline: fetch {spec.url} elsewhere, extract it into {dest} "
            f"(giving {dest / spec.folder}), then set data_root / {ENV_DATA} to {dest}."
        ) from e


def load_cifar(spec: CifarSpec, root: str | None = None, download: bool = False) -> ImageData:
    """Resolve the root, verify (downloading only if asked and needed), then read both splits."""
    base = resolve_root(root)
    if base is None:
        raise DataError(f"no data root for {spec.name}: set data_root in the config / CLI or export "
                        f"{ENV_DATA}=/path/to/folder containing {spec.folder} (add download=true to fetch it there).")
    folder = find_folder(base, spec)
    if download:
        try:
            verify(folder, spec)
        except DataError:
            fetch(spec, folder.parent)
    verify(folder, spec)
    train_x, train_y = read_split(folder, spec.train_files, spec)
    test_x, test_y = read_split(folder, spec.test_files, spec)
    return ImageData(name=spec.name, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                     classes=read_classes(folder, spec), mean=spec.mean, std=spec.std)


@DATASETS.register("cifar10")
def load_cifar10(root: str | None = None, download: bool = False) -> ImageData:
    return load_cifar(CIFAR10, root, download)


@DATASETS.register("cifar100")
def load_cifar100(root: str | None = None, download: bool = False) -> ImageData:
    return load_cifar(CIFAR100, root, download)
