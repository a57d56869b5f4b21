"""Dataset readers: real CIFAR-10 (when IPSD_DATA has it), verification, roots, download, subset, digits."""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from ipsd.data import DATASETS, DataError, ImageData, load_dataset, resolve_root, subset
from ipsd.data import cifar

C10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


# ---------------------------------------------------------------- helpers


def write_pickle(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def write_sha256sums(folder: Path, names: list[str]) -> None:
    lines = [f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n" for n in names]
    (folder / "SHA256SUMS").write_text("".join(lines))


def make_fake_cifar10(folder: Path, per_class: int = 2, manifest: bool = True) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Tiny CIFAR-10 folder in the original layout (bytes keys, protocol 2)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in C10_FILES[:-1]:
        labels = [int(v) for v in rng.permutation(np.repeat(np.arange(10), per_class))]
        data = rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8)
        write_pickle(folder / name, {b"batch_label": b"fake", b"labels": labels, b"data": data,
                                     b"filenames": [b"x.png"] * len(labels)})
        batches[name] = (data, labels)
    write_pickle(folder / "batches.meta", {b"label_names": [f"c{i}".encode() for i in range(10)],
                                           b"num_cases_per_batch": 10 * per_class, b"num_vis": 3072})
    if manifest:
        write_sha256sums(folder, C10_FILES)
    return batches


def make_fake_cifar100(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, n in (("train", 300), ("test", 100)):
        labels = [i % 100 for i in range(n)]
        write_pickle(folder / name, {b"fine_labels": labels, b"coarse_labels": [i % 20 for i in labels],
                                     b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8)})
    write_pickle(folder / "meta", {b"fine_label_names": [f"f{i}".encode() for i in range(100)],
                                   b"coarse_label_names": [f"k{i}".encode() for i in range(20)]})
    write_sha256sums(folder, ["train", "test", "meta"])


def corrupt(path: Path, how: str) -> None:
    if how == "truncate":
        os.truncate(path, path.stat().st_size // 2)
    elif how == "flip":
        pos = path.stat().st_size // 2
        with open(path, "r+b") as f:
            f.seek(pos)
            byte = f.read(1)[0]
            f.seek(pos)
            f.write(bytes([byte ^ 0xFF]))
    else:
        path.unlink()


def assert_names_only(err: DataError, bad: str) -> None:
    """The message names the bad file, gives a fix, and does not blame the good files."""
    msg = str(err)
    assert f"{bad}:" in msg
    assert "download=true" in msg and "IPSD_DATA" in msg
    for other in C10_FILES:
        if other != bad:
            assert f"{other}:" not in msg, msg


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    make_fake_cifar10(tmp_path / "cifar-10-batches-py")
    return tmp_path


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Replace torchvision's downloader (and urlopen) so nothing can reach the network; records calls."""
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.utils as tv_utils

    calls: list[str] = []

    def offline(url: str, *args: object, **kwargs: object) -> None:
        calls.append(str(url))
        raise urllib.error.URLError("offline (test)")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    monkeypatch.setattr(tv_utils, "download_url", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    return calls


# ---------------------------------------------------------------- real CIFAR-10


@pytest.fixture(scope="module")
def cifar10(cifar10_root: Path) -> ImageData:
    return load_dataset("cifar10", str(cifar10_root))


def test_cifar10_shapes_dtypes_labels(cifar10: ImageData) -> None:
    d = cifar10
    assert d.name == "cifar10" and d.num_classes == 10 and d.image_size == 32
    assert d.train_x.shape == (50000, 3, 32, 32) and d.test_x.shape == (10000, 3, 32, 32)
    assert d.train_x.dtype == d.test_x.dtype == torch.uint8
    assert d.train_y.dtype == d.test_y.dtype == torch.int64
    assert d.train_x.is_contiguous() and d.test_x.is_contiguous()
    assert d.train_y.bincount(minlength=10).tolist() == [5000] * 10
    assert d.test_y.bincount(minlength=10).tolist() == [1000] * 10
    assert d.classes[0] == "airplane" and d.classes[9] == "truck"
    lo, hi = d.train_x.aminmax()
    assert (int(lo), int(hi)) == (0, 255)
    sums = d.train_x.numpy().reshape(50000, 3, 1024).sum(axis=2, dtype=np.int64).sum(axis=0)
    assert (sums / (50000 * 1024 * 255)).tolist() == pytest.approx(d.mean, abs=2e-3)  # stats fit the data
    assert d.std == pytest.approx((0.2470, 0.2435, 0.2616))


def test_cifar10_pixels_match_independent_decode(cifar10: ImageData, cifar10_root: Path) -> None:
    folder = cifar10_root / "cifar-10-batches-py"
    for name, offset, split_x, split_y in (("data_batch_1", 0, cifar10.train_x, cifar10.train_y),
                                           ("data_batch_4", 30000, cifar10.train_x, cifar10.train_y),
                                           ("test_batch", 0, cifar10.test_x, cifar10.test_y)):
        with open(folder / name, "rb") as f:
            raw = pickle.load(f, encoding="latin1")  # torchvision's way, str keys
        images = np.asarray(raw["data"]).reshape(-1, 3, 32, 32)
        j = int(np.random.default_rng(7).integers(1, len(images)))
        for i in (0, j, len(images) - 1):
            assert np.array_equal(split_x[offset + i].numpy(), images[i]), (name, i)
        assert split_y[offset:offset + len(images)].tolist() == list(raw["labels"])


@pytest.mark.parametrize("how,bad", [("truncate", "data_batch_2"), ("flip", "test_batch"), ("delete", "batches.meta")])
def test_real_copy_corruption_names_file(cifar10_root: Path, tmp_path: Path, how: str, bad: str) -> None:
    src, dst = cifar10_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py"
    dst.mkdir()
    for name in [*C10_FILES, "SHA256SUMS"]:
        shutil.copyfile(src / name, dst / name)  # copyfile: writable copy even from a read-only source
    assert load_dataset("cifar10", str(tmp_path)).train_x.shape[0] == 50000
    corrupt(dst / bad, how)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", str(tmp_path))
    assert_names_only(err.value, bad)
    assert ("missing" if how == "delete" else "sha256 mismatch") in str(err.value)


def test_real_subset(cifar10: ImageData) -> None:
    s = subset(cifar10, per_class=10, classes=[3, 5], test_per_class=4)
    assert s.classes == ["cat", "dog"] and s.num_classes == 2
    assert s.train_x.shape == (20, 3, 32, 32) and s.test_x.shape == (8, 3, 32, 32)
    cats = cifar10.train_x[cifar10.train_y == 3][:10]
    assert torch.equal(s.train_x[s.train_y == 0], cats)
    assert torch.equal(s.test_x[s.test_y == 1], cifar10.test_x[cifar10.test_y == 5][:4])


# ---------------------------------------------------------------- verification (fake data, always runs)


def test_fake_manifest_loads_exactly(fake_root: Path) -> None:
    batches = make_fake_cifar10(fake_root / "cifar-10-batches-py")
    d = load_dataset("cifar10", str(fake_root))
    train = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(d.train_x.numpy(), train)
    assert d.train_y.tolist() == sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert np.array_equal(d.test_x.numpy(), batches["test_batch"][0].reshape(-1, 3, 32, 32))
    assert d.classes == [f"c{i}" for i in range(10)]
    assert d.train_x.shape == (100, 3, 32, 32) and d.test_x.shape == (20, 3, 32, 32)


@pytest.mark.parametrize("mode", ["sha256", "md5"])
@pytest.mark.parametrize("how,bad", [("truncate", "data_batch_5"), ("flip", "data_batch_1"), ("delete", "test_batch")])
def test_fake_corruption_names_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, how: str, bad: str) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_fake_cifar10(folder, manifest=mode == "sha256")
    if mode == "md5":
        for name in C10_FILES:
            monkeypatch.setitem(cifar.CIFAR10_MD5, name, hashlib.md5((folder / name).read_bytes()).hexdigest())
    load_dataset("cifar10", str(tmp_path))  # intact copy is accepted
    corrupt(folder / bad, how)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", str(tmp_path))
    assert_names_only(err.value, bad)
    if how != "delete":
        assert f"{mode} mismatch" in str(err.value)


def test_md5_used_without_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    make_fake_cifar10(folder, manifest=False)
    with pytest.raises(DataError) as err:  # official MD5s cannot match fake files
        load_dataset("cifar10", str(tmp_path))
    assert "official MD5" in str(err.value)
    assert all(f"{name}: md5 mismatch (expected {cifar.CIFAR10_MD5[name]}" in str(err.value) for name in C10_FILES)
    for name in C10_FILES:
        monkeypatch.setitem(cifar.CIFAR10_MD5, name, hashlib.md5((folder / name).read_bytes()).hexdigest())
    assert load_dataset("cifar10", str(tmp_path)).train_x.shape[0] == 100


def test_manifest_wins_over_md5(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(cifar.CIFAR10_MD5, "data_batch_1", "0" * 32)
    assert load_dataset("cifar10", str(fake_root)).num_classes == 10


def test_manifest_must_list_every_file(fake_root: Path) -> None:
    manifest = fake_root / "cifar-10-batches-py" / "SHA256SUMS"
    manifest.write_text("".join(l for l in manifest.read_text().splitlines(True) if "data_batch_3" not in l))
    with pytest.raises(DataError, match=r"data_batch_3: not listed in .*SHA256SUMS"):
        load_dataset("cifar10", str(fake_root))


def test_malformed_manifest(fake_root: Path) -> None:
    (fake_root / "cifar-10-batches-py" / "SHA256SUMS").write_text("not a checksum line\n")
    with pytest.raises(DataError, match=r"SHA256SUMS: line 1 is not in sha256sum format"):
        load_dataset("cifar10", str(fake_root))


def test_binary_mode_manifest_accepted(fake_root: Path) -> None:
    manifest = fake_root / "cifar-10-batches-py" / "SHA256SUMS"
    manifest.write_text(manifest.read_text().replace("  ", " *"))
    assert load_dataset("cifar10", str(fake_root)).train_x.shape[0] == 100


def test_pickle_with_foreign_object_refused(fake_root: Path) -> None:
    import datetime

    folder = fake_root / "cifar-10-batches-py"
    write_pickle(folder / "data_batch_2", {b"data": datetime.date(2020, 1, 1), b"labels": []})
    write_sha256sums(folder, C10_FILES)
    with pytest.raises(DataError, match=r"data_batch_2: cannot be unpickled.*refusing to load datetime"):
        load_dataset("cifar10", str(fake_root))


def test_wrong_array_shape_names_file(fake_root: Path) -> None:
    folder = fake_root / "cifar-10-batches-py"
    write_pickle(folder / "test_batch", {b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]})
    write_sha256sums(folder, C10_FILES)
    with pytest.raises(DataError, match=r"test_batch: expected uint8 data \(N, 3072\)"):
        load_dataset("cifar10", str(fake_root))


def test_fake_cifar100(tmp_path: Path) -> None:
    make_fake_cifar100(tmp_path / "cifar-100-python")
    d = load_dataset("cifar100", str(tmp_path))
    assert d.train_x.shape == (300, 3, 32, 32) and d.test_x.shape == (100, 3, 32, 32)
    assert d.num_classes == 100 and d.classes[42] == "f42"
    assert d.train_y.tolist() == [i % 100 for i in range(300)]
    assert d.mean == pytest.approx((0.5071, 0.4867, 0.4408)) and d.std == pytest.approx((0.2675, 0.2565, 0.2761))


# ---------------------------------------------------------------- root resolution


def test_resolve_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("IPSD_DATA", raising=False)
    assert resolve_root(None) is None and resolve_root("") is None
    assert resolve_root(str(tmp_path)) == tmp_path
    assert resolve_root("~/x") == Path.home() / "x"
    monkeypatch.setenv("IPSD_DATA", "/env/data")
    assert resolve_root(None) == Path("/env/data")
    assert resolve_root(str(tmp_path)) == tmp_path  # argument wins


def test_root_forms(fake_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPSD_DATA", str(fake_root / "nowhere"))
    parent = load_dataset("cifar10", str(fake_root))  # argument beats a bad IPSD_DATA
    itself = load_dataset("cifar10", str(fake_root / "cifar-10-batches-py"))
    assert torch.equal(parent.train_x, itself.train_x)
    monkeypatch.setenv("IPSD_DATA", str(fake_root))
    assert torch.equal(load_dataset("cifar10").train_x, parent.train_x)


def test_no_root_anywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IPSD_DATA", raising=False)
    with pytest.raises(DataError, match=r"no data root for cifar10.*IPSD_DATA.*cifar-10-batches-py"):
        load_dataset("cifar10")


def test_empty_root_reports_missing_files(tmp_path: Path, no_download: list[str]) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", str(tmp_path))
    msg = str(err.value)
    assert all(f"{n}: missing (expected {tmp_path / 'cifar-10-batches-py' / n})" in msg for n in C10_FILES)
    assert no_download == []  # never downloads unless asked


# ---------------------------------------------------------------- download


@pytest.mark.parametrize("name,archive", [("cifar10", "cifar-10-python.tar.gz"), ("cifar100", "cifar-100-python.tar.gz")])
def test_download_offline_is_clear(tmp_path: Path, no_download: list[str], name: str, archive: str) -> None:
    with pytest.raises(DataError) as err:
        load_dataset(name, str(tmp_path), download=True)
    msg = str(err.value)
    assert f"https://www.cs.toronto.edu/~kriz/{archive}" in msg
    assert "URLError" in msg and "offline" in msg and "IPSD_DATA" in msg
    assert len(no_download) == 1 and no_download[0].endswith(archive)


def test_download_skipped_when_data_verifies(fake_root: Path, no_download: list[str]) -> None:
    assert load_dataset("cifar10", str(fake_root), download=True).train_x.shape[0] == 100
    assert no_download == []


# ---------------------------------------------------------------- subset


def synthetic(n_per_class: int = 6, n_classes: int = 3) -> ImageData:
    """Labels in a shuffled order; pixel value = image index, so picks can be read back."""
    rng = np.random.default_rng(3)
    y = torch.from_numpy(rng.permutation(np.repeat(np.arange(n_classes), n_per_class)).astype(np.int64))
    x = torch.arange(len(y), dtype=torch.uint8).view(-1, 1, 1, 1).expand(-1, 3, 2, 2).contiguous()
    return ImageData("syn", x, y, x.clone(), y.clone(), [f"k{i}" for i in range(n_classes)],
                     (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))


def first_indices(y: torch.Tensor, classes: list[int], k: int) -> list[int]:
    return sorted(i for c in classes for i in [j for j in range(len(y)) if int(y[j]) == c][:k])


def test_subset_first_per_class_in_file_order() -> None:
    d = synthetic()
    s = subset(d, per_class=2, test_per_class=1)
    assert s.train_x[:, 0, 0, 0].tolist() == first_indices(d.train_y, [0, 1, 2], 2)
    assert s.test_x[:, 0, 0, 0].tolist() == first_indices(d.test_y, [0, 1, 2], 1)
    assert s.train_y.bincount().tolist() == [2, 2, 2] and s.test_y.bincount().tolist() == [1, 1, 1]
    assert s.classes == d.classes and s.mean == d.mean and s.train_x.is_contiguous()
    full = subset(d)
    assert torch.equal(full.train_x, d.train_x) and torch.equal(full.test_y, d.test_y)


def test_subset_classes_relabel_in_given_order() -> None:
    d = synthetic()
    s = subset(d, per_class=3, classes=[2, 0])
    assert s.classes == ["k2", "k0"] and s.num_classes == 2
    picked = s.train_x[:, 0, 0, 0].tolist()
    assert picked == first_indices(d.train_y, [2, 0], 3)
    assert s.train_y.tolist() == [0 if int(d.train_y[i]) == 2 else 1 for i in picked]
    assert s.test_y.bincount().tolist() == [6, 6]  # test_per_class None keeps all test images of those classes


@pytest.mark.parametrize("kwargs,match", [
    ({"classes": [0, 3]}, r"out of range"),
    ({"classes": [-1]}, r"out of range"),
    ({"classes": []}, r"must not be empty"),
    ({"classes": [1, 1]}, r"duplicate"),
    ({"per_class": 0}, r"per_class must be >= 1"),
    ({"test_per_class": 0}, r"test_per_class must be >= 1"),
    ({"per_class": 7}, r"class 0 has only 6 train images, asked for 7"),
    ({"classes": [2], "test_per_class": 9}, r"class 2 has only 6 test images, asked for 9"),
])
def test_subset_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        subset(synthetic(), **kwargs)


def test_imagedata_validates() -> None:
    d = synthetic()
    with pytest.raises(ValueError, match="uint8"):
        ImageData("bad", d.train_x.float(), d.train_y, d.test_x, d.test_y, d.classes, d.mean, d.std)
    with pytest.raises(ValueError, match="int64"):
        ImageData("bad", d.train_x, d.train_y.int(), d.test_x, d.test_y, d.classes, d.mean, d.std)


# ---------------------------------------------------------------- digits fallback


@pytest.fixture(scope="module")
def digits() -> ImageData:
    return load_dataset("digits")


def test_registry_names() -> None:
    assert DATASETS.names() == ["cifar10", "cifar100", "digits"]
    with pytest.raises(KeyError, match="cifar10"):
        load_dataset("cifar-10")


def test_digits_shapes_and_split(digits: ImageData) -> None:
    from sklearn.datasets import load_digits

    target = load_digits().target
    counts = np.bincount(target)
    assert digits.train_x.shape == (1442, 3, 32, 32) and digits.test_x.shape == (355, 3, 32, 32)
    assert digits.train_x.dtype == torch.uint8 and digits.train_y.dtype == torch.int64
    assert digits.train_x.is_contiguous() and digits.test_x.is_contiguous()
    assert digits.num_classes == 10 and digits.image_size == 32 and digits.classes[3] == "3"
    assert digits.test_y.bincount(minlength=10).tolist() == (counts // 5).tolist()  # stratified
    assert (digits.train_y.bincount(minlength=10) + digits.test_y.bincount(minlength=10)).tolist() == counts.tolist()
    assert "digits fallback" in digits.note


def test_digits_pixels(digits: ImageData) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for x in (digits.train_x, digits.test_x):
        assert int(x[:, :, :4].max()) == 0 and int(x[:, :, -4:].max()) == 0  # zero padding rows
        assert int(x[:, :, :, :4].max()) == 0 and int(x[:, :, :, -4:].max()) == 0  # and columns
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 0], x[:, 2])  # grey in 3 channels
    inner = digits.test_x[:, 0, 4:28, 4:28]
    assert torch.equal(inner, inner[:, ::3, ::3].repeat_interleave(3, 1).repeat_interleave(3, 2))  # nearest x3
    # first test image of class 0 is the 5th class-0 image of the file; first train image is image 0
    fifth = np.flatnonzero(bunch.target == 0)[4]
    expected = np.rint(bunch.images[fifth] * 255 / 16).astype(np.uint8)
    assert np.array_equal(digits.test_x[digits.test_y == 0][0, 0, 4:28:3, 4:28:3].numpy(), expected)
    assert np.array_equal(digits.train_x[0, 0, 4:28:3, 4:28:3].numpy(), np.rint(bunch.images[0] * 255 / 16))
    assert int(digits.train_x.max()) == 255


def test_digits_stats_from_train(digits: ImageData) -> None:
    f = digits.train_x.double() / 255
    assert digits.mean == pytest.approx(f.mean(dim=(0, 2, 3)).tolist())
    assert digits.std == pytest.approx(f.std(dim=(0, 2, 3), unbiased=False).tolist())


# ---------------------------------------------------------------- the cifar10_root rule itself


@pytest.mark.parametrize("ci,data,outcome", [("", "", "1 skipped"), ("1", "", "1 error"),
                                             ("1", "{tmp}/nothing", "1 error"), ("1", "{tmp}", "1 passed")])
def test_cifar10_root_fixture_rule(tmp_path: Path, ci: str, data: str, outcome: str) -> None:
    """Skip without data locally, fail under CI, pass when IPSD_DATA holds cifar-10-batches-py."""
    import subprocess
    import sys

    shutil.copyfile(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_probe.py").write_text("def test_probe(cifar10_root):\n    assert cifar10_root.is_dir()\n")
    (tmp_path / "cifar-10-batches-py").mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "IPSD_DATA")}
    env.update({k: v.format(tmp=tmp_path) for k, v in (("CI", ci), ("IPSD_DATA", data)) if v})
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert outcome in run.stdout, run.stdout
    assert (run.returncode == 0) == (outcome != "1 error")
