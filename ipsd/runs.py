"""Run folders: the one owner of a run's files, their names, their formats and their checked reads.

A run lives in ``<out>/<run id>/``, the run id being a hash of what the run computes (its identity):

  config.yaml    the resolved config (written with the first checkpoint, so a run that fails before its
                 first epoch ends leaves no folder behind)
  log.jsonl      one JSON line per finished epoch
  checkpoint.pt  everything needed to resume; written atomically every epoch (the one before it is kept as
                 checkpoint.prev.pt, the fallback when checkpoint.pt is found damaged)
  result.json    the finished run's record (``"format": 1``); its presence marks the run done
  eval/<suite>.json  post-hoc evaluations of the finished model (``ipsd evaluate RUN --suite ...``,
                 ``"format": 1``): the suite's settings and its flat ``metrics``

Every write is atomic (temporary file, fsync, rename), so readers never see half a file; every read goes
through :class:`RunFolder`, which turns an unreadable file into a :class:`RecordError` naming the file,
what is wrong and the fix. This module imports no torch at import time, so record readers stay light.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import json
import math
import os
import platform
import resource
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import RecordError

CONFIG_FILE, LOG_FILE, CHECKPOINT_FILE, RESULT_FILE = "config.yaml", "log.jsonl", "checkpoint.pt", "result.json"
PREVIOUS_CHECKPOINT_FILE = "checkpoint.prev.pt"
RESULT_FORMAT = 1  # result.json schema; records written before the field existed read as format 0
EVAL_DIR, EVAL_FORMAT = "eval", 1  # eval/<suite>.json and its schema

_UMASK = os.umask(0)
os.umask(_UMASK)


def run_hash(identity: dict[str, Any]) -> str:
    """Short stable hash of a run's identity (the resolved config without operational keys)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the permissions open() would
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_write_yaml(path: Path, obj: Any) -> None:
    atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: Path, what: str, fix: str) -> Any:
    """A JSON file's content; an unreadable or truncated file is a RecordError with ``fix``."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: unreadable {what} ({type(e).__name__}: {e}); {fix}") from None


@dataclass(frozen=True)
class RunFolder:
    """One run's folder and the only place its file names and formats are spelled."""

    path: Path

    @classmethod
    def of(cls, out: str | Path, run_id: str) -> RunFolder:
        return cls(Path(out) / run_id)

    @property
    def run_id(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.path / LOG_FILE

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT_FILE

    @property
    def result_path(self) -> Path:
        return self.path / RESULT_FILE

    def status(self) -> str:
        """``done`` (a readable result.json), ``partial`` (a checkpoint, no result) or ``missing``."""
        if self.read_result() is not None:
            return "done"
        return "partial" if self.checkpoint_path.is_file() else "missing"

    # -- result.json
    def read_result(self) -> Record | None:
        """The finished run's record, or None when the run has not finished."""
        if not self.result_path.is_file():
            return None
        data = read_json(self.result_path, "run record",
                         f"move it aside (e.g. mv {self.result_path} {self.result_path}.bad) and re-run the same "
                         "command: the run resumes from its checkpoint, or retrains if there is none")
        if not isinstance(data, dict):
            raise RecordError(f"{self.result_path}: not an ipsd run record (not a JSON object); move it aside and "
                              "re-run the same command")
        rec = Record(data, self.result_path)
        if rec.run_id not in (None, self.run_id):
            raise RecordError(f"{self.result_path}: record says run_id {rec.run_id!r} but the folder is run "
                              f"{self.run_id!r}; the folder was copied or renamed, remove it")
        if "final" not in data:
            raise RecordError(f"{self.result_path}: not an ipsd run record (no 'final' entry); move it aside and "
                              "re-run the same command")
        return rec

    def write_result(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.result_path, {**record, "format": RESULT_FORMAT})

    # -- eval/<suite>.json
    def eval_path(self, suite: str) -> Path:
        if not suite.isidentifier():
            raise RecordError(f"evaluation suite {suite!r} is not a plain name (letters, digits, _)")
        return self.path / EVAL_DIR / f"{suite}.json"

    def read_eval(self, suite: str) -> EvalRecord | None:
        """The run's finished ``suite`` evaluation, or None when it has not been made."""
        path = self.eval_path(suite)
        if not path.is_file():
            return None
        data = read_json(path, f"{suite} evaluation", f"delete it (rm {path}) and re-run `ipsd evaluate {self.path} "
                                                      f"--suite {suite}`")
        if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
            raise RecordError(f"{path}: not an ipsd evaluation (no 'metrics' mapping); delete it and re-run "
                              f"`ipsd evaluate {self.path} --suite {suite}`")
        return EvalRecord(data, path)

    def write_eval(self, suite: str, result: dict[str, Any]) -> None:
        atomic_write_json(self.eval_path(suite), {**result, "suite": suite, "format": EVAL_FORMAT})

    # -- config.yaml
    def read_config(self) -> dict[str, Any]:
        try:
            data = yaml.safe_load(self.config_path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            raise RecordError(f"{self.config_path}: unreadable run config ({type(e).__name__}); this is not a usable "
                              "run folder: move it aside and re-run") from None
        if not isinstance(data, dict):
            raise RecordError(f"{self.config_path}: expected a mapping of config keys; move the folder aside and re-run")
        return data

    def write_config(self, config: dict[str, Any]) -> None:
        atomic_write_yaml(self.config_path, config)

    # -- log.jsonl
    def read_log(self) -> list[dict[str, Any]]:
        if not self.log_path.is_file():
            return []
        try:
            return [json.loads(line) for line in self.log_path.read_text().splitlines() if line.strip()]
        except (OSError, json.JSONDecodeError) as e:
            raise RecordError(f"{self.log_path}: unreadable epoch log ({e}); the checkpoint holds the same history: "
                              "delete the log and re-run to rewrite it") from None

    def write_log(self, history: list[dict[str, Any]]) -> None:
        atomic_write_text(self.log_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in history))

    # -- checkpoint.pt
    @property
    def previous_checkpoint_path(self) -> Path:
        return self.path / PREVIOUS_CHECKPOINT_FILE

    def save_checkpoint(self, obj: Any) -> None:
        """Write the new checkpoint atomically, keeping the one it replaces as ``checkpoint.prev.pt``: a checkpoint
        damaged later (a full disk, a copy cut short) still leaves the epoch before it to resume from."""
        import torch

        buf = io.BytesIO()
        torch.save(obj, buf)
        if self.checkpoint_path.exists():
            os.replace(self.checkpoint_path, self.previous_checkpoint_path)
        atomic_write_bytes(self.checkpoint_path, buf.getvalue())

    def load_checkpoint(self, map_location: Any = "cpu", weights_only: bool = False) -> dict[str, Any]:
        """The latest readable checkpoint: ``checkpoint.pt``, else (it is missing or damaged) the previous one,
        which is then made the current one; neither readable is a RecordError naming both files."""
        try:
            return load_checkpoint_file(self.checkpoint_path, map_location, weights_only)
        except RecordError as e:
            if not self.previous_checkpoint_path.is_file():
                raise
            try:
                ckpt = load_checkpoint_file(self.previous_checkpoint_path, map_location, weights_only)
            except RecordError:
                raise RecordError(f"{e} (the previous checkpoint {self.previous_checkpoint_path.name} is unreadable "
                                  "too)") from None
            damaged = self.path / f"{CHECKPOINT_FILE}.damaged"
            if self.checkpoint_path.exists():
                os.replace(self.checkpoint_path, damaged)  # kept for inspection, never deleted
            os.replace(self.previous_checkpoint_path, self.checkpoint_path)
            import sys

            print(f"ipsd: warning: {e.args[0].split(';')[0]}; resuming from the previous checkpoint instead "
                  f"(the damaged file is kept as {damaged.name})", file=sys.stderr)
            return ckpt

    @contextlib.contextmanager
    def training_lock(self):
        """Hold an exclusive lock on the run for the life of a training process. The OS releases it when the process
        dies (even by kill -9), so it never goes stale; a second trainer of the same run is refused with the holder's
        pid. The lock file lives beside the run folders (``<out>/.locks/<run id>.lock``), which may not exist yet."""
        lock = self.path.parent / ".locks" / f"{self.run_id}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "unknown"
                raise RecordError(f"run {self.run_id} ({self.path}) is being trained by another process (pid {holder}, "
                                  f"lock {lock}); wait for it to finish or stop it, then re-run") from None
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


def load_checkpoint_file(path: Path, map_location: Any = "cpu", weights_only: bool = False) -> dict[str, Any]:
    """A checkpoint's content; a truncated, empty or foreign file is a RecordError naming the file and the fix."""
    import torch

    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=weights_only)
    except Exception as e:  # noqa: BLE001 -- torch raises many types (EOFError, RuntimeError, OSError, ...)
        raise RecordError(f"{path}: unreadable checkpoint ({type(e).__name__}: {str(e)[:120]}); move it aside "
                          f"(mv {path} {path}.bad) and re-run the same command to retrain the run") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise RecordError(f"{path}: not an ipsd checkpoint (no 'model' entry); move it aside and re-run")
    return ckpt


class Record:
    """A finished run's ``result.json``, read through named accessors so no caller spells its keys."""

    def __init__(self, data: dict[str, Any], path: Path | None = None):
        self.data, self.path = data, path

    def _num(self, *keys: str) -> float:
        """Nested numeric field, NaN when any level is missing (older records)."""
        cur: Any = self.data
        for k in keys:
            if not isinstance(cur, dict) or cur.get(k) is None:
                return math.nan
            cur = cur[k]
        return float(cur)

    @property
    def format(self) -> int:
        return int(self.data.get("format", 0))

    @property
    def run_id(self) -> str | None:
        return self.data.get("run_id")

    def top1(self, metric: str = "last") -> float:
        """Test top-1 (%) of the last epoch (``last``) or of the best epoch, selected on the test set (``best``)."""
        return self._num("final" if metric == "last" else "best", "top1")

    def top5(self, metric: str = "last") -> float:
        return self._num("final" if metric == "last" else "best", "top5")

    @property
    def best_epoch(self) -> float:
        return self._num("best", "epoch")

    @property
    def train_top1(self) -> float:
        """Top-1 (%) of a clean (unaugmented) pass over the training set after the last epoch; NaN if unrecorded."""
        return self._num("final", "train_top1")

    @property
    def images_per_step(self) -> float:
        return self._num("images_per_step")

    @property
    def wall_seconds(self) -> float:
        return self._num("wall_seconds")

    @property
    def world_size(self) -> float:
        w = self._num("hardware", "world_size")
        return 1.0 if math.isnan(w) else w

    @property
    def device_hours(self) -> float:
        return self.wall_seconds * self.world_size / 3600

    @property
    def device_name(self) -> str:
        """The accelerator model when there is one (``NVIDIA H100 ...``), else the device type (``cpu``)."""
        hw = self.data.get("hardware") or {}
        if hw.get("gpu"):
            return str(hw["gpu"])
        return str(hw.get("device", "unknown")).split(":")[0]

    @property
    def environment(self) -> str:
        """The machine and software behind the numbers, in a few words (CPU or GPU model, threads, torch)."""
        hw, ver = self.data.get("hardware") or {}, self.data.get("versions") or {}
        where = hw.get("gpu") or f"{hw.get('cpu', '?')}, {hw.get('torch_threads', '?')} thread(s)"
        return f"{where}; torch {ver.get('torch', '?')}"

    @property
    def execution(self) -> dict[str, Any]:
        """What besides the identity decided the numbers (device type, CPU threads); empty in older records."""
        return dict(self.data.get("execution") or {})

    @property
    def config(self) -> dict[str, Any]:
        return dict(self.data.get("config") or {})

    @property
    def curve(self) -> list[dict[str, Any]]:
        return list(self.data.get("curve") or [])


class EvalRecord:
    """One ``eval/<suite>.json``: its settings and flat metrics (named as in the paper CSVs where they exist)."""

    def __init__(self, data: dict[str, Any], path: Path | None = None):
        self.data, self.path = data, path

    @property
    def suite(self) -> str:
        return str(self.data.get("suite"))

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self.data.get("settings") or {})

    @property
    def metrics(self) -> dict[str, float]:
        return dict(self.data["metrics"])

    def metric(self, key: str) -> float:
        """A metric's value, NaN when this evaluation lacks it."""
        value = self.data["metrics"].get(key)
        return math.nan if value is None else float(value)


def git_commit() -> str | None:
    """The code version: HEAD of the repository holding this package, '+dirty' if modified."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "torchvision", "numpy", "timm", "ipsd"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: Any, world: int) -> dict[str, Any]:
    import torch

    info = {"device": str(device), "world_size": world, "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def peak_memory_mib(device: Any) -> float:
    """Peak accelerator memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
