"""Config resolution: names -> registered classes, model-dependent defaults, the run's identity and id.

Resolution reads only code and the config: it imports no loader and no FFCV and touches no dataset, so the
planner and the reporter can resolve every run of a table on any machine. What the environment must
provide (FFCV installed, a CUDA device, the data) is checked where training starts (``ipsd.engine``).
"""
from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from typing import Any

from .config import ConfigError, RunConfig, to_dict
from .data import DATASETS
from .data.batch import Needs
from .data.folders import FILE_DATASETS
from .method import METHODS, Method
from .models import MODELS
from .registry import Registry
from .runs import RunFolder, run_hash
from .teacher_registry import teacher_identity


def load_methods() -> Registry[type[Method]]:
    """Import every module of the ``baselines`` package so each method registers itself."""
    import baselines

    for info in pkgutil.iter_modules(baselines.__path__):
        importlib.import_module(f"baselines.{info.name}")
    return METHODS


@dataclasses.dataclass
class Resolved:
    """A config with every default filled in, plus the classes it names."""

    cfg: RunConfig
    method_cls: type[Method]
    method_cfg: Any

    @property
    def run_id(self) -> str:
        return run_hash(self.cfg.identity())

    @property
    def folder(self) -> RunFolder:
        return RunFolder.of(self.cfg.out, self.run_id)

    @property
    def needs(self) -> Needs:
        """What the method's batches hold, known without building the method."""
        return self.method_cls.needs_for(self.method_cfg)

    @property
    def images_per_step(self) -> int:
        """Images per optimizer step over all ranks: the global batch times images per anchor."""
        return self.cfg.batch_size * self.needs.images_per_anchor


def _lookup(registry, name: str, key: str):
    try:
        return registry.get(name)
    except KeyError as e:
        raise ConfigError(f"{key}: {e.args[0]}") from None


def is_file_dataset(name: str) -> bool:
    """Read from disk per batch (folder or ffcv loader) rather than held in memory (DeviceLoader)."""
    return name.lower() in FILE_DATASETS


def _resolve_loader(cfg: RunConfig) -> str:
    """The loader a run uses: memory for in-memory datasets, folder (default) or ffcv for on-disk ones."""
    on_disk = is_file_dataset(cfg.dataset)
    loader = cfg.loader or ("folder" if on_disk else "memory")
    if on_disk == (loader == "memory"):
        kinds = "folder | ffcv" if on_disk else "memory"
        raise ConfigError(f"loader={loader} does not fit dataset={cfg.dataset}, which is "
                          f"{'read from disk' if on_disk else 'held in memory'}; use loader={kinds} (or leave it unset)")
    return loader


def resolve(cfg: RunConfig) -> Resolved:
    """Fill model-dependent defaults (LR, the method's per-model hyper-parameters) and validate names."""
    load_methods()
    method_cls = _lookup(METHODS, cfg.method, "method")
    spec = _lookup(MODELS, cfg.model, "model")
    if not is_file_dataset(cfg.dataset):
        try:
            DATASETS.get(cfg.dataset)
        except KeyError as e:
            raise ConfigError(f"dataset: {e.args[0]}; on-disk datasets: {', '.join(FILE_DATASETS.names())}") from None
    loader = _resolve_loader(cfg)
    method_cfg = method_cls.resolve_config(spec.name, cfg.method_args)
    method_cls.needs_for(method_cfg)  # a config error the needs reveal (e.g. VRM's RandAugment range) stops here
    if method_cls.needs_teacher and not cfg.teacher:
        raise ConfigError(f"method {method_cls.name!r} needs a teacher: pass teacher=<name in results/teachers.yaml "
                          f"| run folder of a finished `ipsd train method=hard ...` | its checkpoint.pt>")
    if cfg.teacher and not method_cls.needs_teacher:
        raise ConfigError(f"method {method_cls.name!r} takes no teacher; remove teacher={cfg.teacher!r}")
    teacher_id = teacher_identity(cfg.teacher) if cfg.teacher else None
    cfg = dataclasses.replace(cfg, method=method_cls.name, model=spec.name, dataset=cfg.dataset.lower(),
                              lr=cfg.lr if cfg.lr is not None else spec.lr, method_args=to_dict(method_cfg),
                              teacher_id=teacher_id, loader=loader)
    return Resolved(cfg, method_cls, method_cfg)
