"""Teacher references without torch: registry names (results/teachers.yaml), run folders, checkpoint
checksums and the identity a student records. ``ipsd teacher list|register`` need nothing else."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import yaml

from .config import ConfigError
from .runs import CHECKPOINT_FILE, CONFIG_FILE, RunFolder, atomic_write_text

REGISTRY = Path(__file__).resolve().parents[1] / "results" / "teachers.yaml"
RUN_ID = re.compile(r"^[0-9a-f]{12}$")


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (checkpoints can be hundreds of MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def locate(ref: str | Path) -> tuple[RunFolder, Path]:
    """A run folder or its checkpoint file -> (the run folder, the checkpoint file); both must exist."""
    path = Path(ref).expanduser()
    if path.is_dir():
        run, ckpt = RunFolder(path), RunFolder(path).checkpoint_path
    elif path.is_file():
        run, ckpt = RunFolder(path.parent), path
    else:
        raise ConfigError(f"teacher {str(ref)!r} does not exist; pass the folder of a finished run "
                          f"(holding {CONFIG_FILE} and {CHECKPOINT_FILE}, e.g. from `ipsd train method=hard ...`) "
                          f"or that folder's {CHECKPOINT_FILE}")
    for need in (run.config_path, ckpt):
        if not need.is_file():
            raise ConfigError(f"teacher {str(ref)!r}: {need} is missing; a teacher is a run folder written by "
                              f"`ipsd train` (it holds {CONFIG_FILE} and {CHECKPOINT_FILE})")
    if ckpt.stat().st_size == 0:
        raise ConfigError(f"teacher {str(ref)!r}: {ckpt} is empty (0 bytes); retrain the teacher run or point "
                          "teacher= at an intact copy")
    return run, ckpt


def read_registry(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """``name -> {run, sha256, top1, recipe}`` from results/teachers.yaml (missing file: empty)."""
    path = path or REGISTRY
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of teacher name -> entry")
    return data


def resolve_ref(ref: str) -> tuple[Path, dict[str, Any] | None]:
    """A teacher reference -> (run folder or checkpoint path, registry entry if it was a registered name)."""
    entry = read_registry().get(ref)
    if entry is None:
        return Path(ref).expanduser(), None
    if not entry.get("run"):
        recipe = " ".join(f"{k}={v}" for k, v in (entry.get("recipe") or {}).items())
        raise ConfigError(f"teacher {ref!r} is registered in {REGISTRY} but not trained yet: run "
                          f"`ipsd train method=hard {recipe}`, then `ipsd teacher register {ref} <run folder>`")
    run = Path(entry["run"]).expanduser()
    return (run if run.is_absolute() else REGISTRY.parents[1] / run), entry


def teacher_identity(ref: str) -> str:
    """What a student's identity records about its teacher: ``run:<run id>`` (a run folder's name is the
    hash of its identity, so this is known before the teacher has trained) or the checkpoint's sha256."""
    path, _ = resolve_ref(ref)
    folder = path.parent if path.suffix == ".pt" else path
    if RUN_ID.match(folder.name):
        return f"run:{folder.name}"
    if path.is_file():
        return f"sha256:{sha256_file(path)}"
    _, ckpt = locate(path)
    return f"sha256:{sha256_file(ckpt)}"


def register(name: str, run: str | Path, path: Path | None = None) -> dict[str, Any]:
    """Record a finished run as the named teacher: its folder, checkpoint sha256 and test top-1."""
    path = path or REGISTRY
    folder, ckpt = locate(run)
    record = folder.read_result()
    if record is None:
        raise ConfigError(f"{folder.path} has no finished record: only a finished run can be registered as a teacher")
    entries = read_registry(path)
    entries[name] = {**entries.get(name, {}), "run": str(folder.path.resolve()), "sha256": sha256_file(ckpt),
                     "top1": record.top1("last"), "model": record.data["model"], "dataset": record.data["dataset"]}
    atomic_write_text(path, yaml.safe_dump(entries, sort_keys=True))
    return entries[name]
