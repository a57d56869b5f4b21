"""Config resolution: names -> registered classes, model-dependent defaults, the run's identity and id.

Resolution reads only code and the config: it imports no loader and no FFCV and touches no dataset, so the
planner and the reporter can resolve every run of a table on any machine. What the environment must
provide (FFCV installed, a CUDA device, the data) is checked where training starts (``ipsd.engine``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path
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


def load_methods(plugins: Sequence[str] = ()) -> Registry[type[Method]]:
    """Import every module of the ``baselines`` package, then the user's ``plugins``, so each method registers
    itself."""
    import baselines

    for info in pkgutil.iter_modules(baselines.__path__):
        importlib.import_module(f"baselines.{info.name}")
    for plugin in plugins:
        import_plugin(plugin)
    return METHODS


def import_plugin(ref: str) -> str:
    """Import a plugin (a dotted module name, or the path of a .py file; a file again when its source changed);
    returns its identity,
    ``<module>@sha256:<digest of its source file>``, so a result traces back to the exact code that produced it."""
    path = Path(ref).expanduser()
    try:
        if ref.endswith(".py"):
            if not path.is_file():
                raise ConfigError(f"plugins: {ref!r} does not exist; give the path of a .py file or a module name")
            name = f"ipsd_plugin_{path.stem}"
            module = sys.modules.get(name)
            code = path.read_bytes()
            if module is None or Path(module.__file__).resolve() != path.resolve() or \
                    getattr(module, "__ipsd_source__", None) != code:  # edited since: run the new code
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                module.__ipsd_source__ = code  # the source the identity's hash is taken of
                spec.loader.exec_module(module)
        else:
            if "" not in sys.path and str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))  # `python -m ipsd` puts the cwd first; the console script does not
            module = importlib.import_module(ref)
    except ConfigError:
        raise
    except ModuleNotFoundError as e:
        raise ConfigError(f"plugins: cannot import {ref!r} ({e}); give a module importable from the working directory "
                          "or PYTHONPATH, or the path of a .py file") from None
    except Exception as e:  # noqa: BLE001 -- the user's code failed while registering: one line, not their traceback
        sys.modules.pop(f"ipsd_plugin_{path.stem}", None)
        raise ConfigError(f"plugins: importing {ref!r} failed: {type(e).__name__}: {e}") from None
    source = Path(getattr(module, "__file__", "") or "")
    if not source.is_file():
        raise ConfigError(f"plugins: {ref!r} has no source file to hash; a plugin must be a .py module")
    code = getattr(module, "__ipsd_source__", None) or source.read_bytes()  # a file plugin: the bytes that ran
    return f"{module.__name__.removeprefix('ipsd_plugin_')}@sha256:{hashlib.sha256(code).hexdigest()}"


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
    plugins = {import_plugin(p): p for p in cfg.plugins}
    method_cls = _lookup(METHODS, cfg.method, "method")
    # only the plugin that defines the run's method is part of its identity: a Hard Label run in a table that
    # loads a plugin for another row computes exactly what it computes without it, and stays the same run
    module = method_cls.__module__.removeprefix("ipsd_plugin_")
    plugin_ids = [pid for pid in plugins if pid.split("@")[0] == module]
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
                              teacher_id=teacher_id, loader=loader, plugin_ids=plugin_ids)
    return Resolved(cfg, method_cls, method_cfg)
