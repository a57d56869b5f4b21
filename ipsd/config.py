"""Typed run configuration: YAML + ``key=value`` overrides -> validated dataclasses.

Every hyper-parameter field declares its allowed range or choices once (``param``); one generic
validator enforces them, so a bad value is refused with the key name and the allowed range.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError  # noqa: F401 -- the config layer's error, imported from here by most modules
from .registry import closest


def param(default: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
          choices: tuple | None = None, doc: str = "") -> Any:
    """A dataclass field carrying its validation rule (range or choices) and a one-line doc."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _allowed(f: dataclasses.Field) -> str:
    m = f.metadata
    if m.get("choices"):
        return "one of " + ", ".join(map(repr, m["choices"]))
    lo, hi = m.get("lo"), m.get("hi")
    left = ("(" if m.get("lo_open") else "[") + ("-inf" if lo is None else f"{lo:g}")
    return f"{left}, {'inf' if hi is None else f'{hi:g}'}]"


def _check_type(name: str, value: Any, tp: Any) -> Any:
    """Coerce/verify a parsed YAML value against a field annotation (int->float allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(name, value, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{name}: bad value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        (inner,) = typing.get_args(tp) or (Any,)
        return [_check_type(f"{name}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{name} must be {tp.__name__}, got {value!r}")
    return value


def build(cls: type, values: dict[str, Any], where: str = "") -> Any:
    """Instantiate dataclass ``cls`` from a dict, refusing unknown keys and out-of-range values."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown key '{where}{key}'; did you mean {closest(key, list(fields))}?")
        kwargs[key] = _check_type(where + key, value, hints[key])
    obj = cls(**kwargs)
    validate(obj, where)
    return obj


def validate(obj: Any, where: str = "") -> None:
    """Enforce every field's declared range/choices."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        m = f.metadata
        if v is None or not m:
            continue
        if m.get("choices") and v not in m["choices"]:
            raise ConfigError(f"{where}{f.name}={v!r} is not allowed; use {_allowed(f)}")
        items = v if isinstance(v, list) else [v]
        for x in items:
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                continue
            lo, hi = m.get("lo"), m.get("hi")
            bad = (lo is not None and (x <= lo if m.get("lo_open") else x < lo)) or (hi is not None and x > hi)
            if bad:
                raise ConfigError(f"{where}{f.name}={x!r} is out of range; allowed {_allowed(f)}")


def describe(cls: type, overrides: dict[str, dict[str, Any]] | None = None) -> str:
    """One line per field of config dataclass ``cls``: name, type, default, allowed values and doc; ``overrides``
    ({model: {field: value}}) adds each field's per-model defaults."""
    hints = typing.get_type_hints(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        tp = getattr(hints[f.name], "__name__", None) or str(hints[f.name]).replace("typing.", "")
        allowed = f" {_allowed(f)}" if f.metadata.get("choices") or f.metadata.get("lo") is not None \
            or f.metadata.get("hi") is not None else ""
        per_model = {m: v[f.name] for m, v in (overrides or {}).items() if f.name in v}
        models = "; per model: " + ", ".join(f"{m} {v!r}" for m, v in sorted(per_model.items())) if per_model else ""
        doc = f.metadata.get("doc", "")
        lines.append(f"  {f.name} ({tp}, default {default!r}{allowed}{models})" + (f": {doc}" if doc else ""))
    return "\n".join(lines)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)


# Keys that say where/how a run executes, not what it computes: excluded from the run identity.
OPERATIONAL_KEYS = ("out", "device", "stop_after", "data_root", "download", "progress", "deterministic", "teacher",
                    "workers", "ffcv_dir", "eval_batch_size", "threads", "plugins", "compile_mode")
# Keys that only on-disk datasets use: left out of the identity of an in-memory run, where they change nothing.
ON_DISK_KEYS = ("image_size",)


@dataclass
class RunConfig:
    """One training run. Defaults are the IPS paper's CIFAR-100 recipe (RepDistiller's)."""

    method: str = param("ips", doc="registered method name (see `ipsd list`)")
    model: str = param("resnet18", doc="registered model name")
    dataset: str = param("cifar100", doc="cifar10 | cifar100 | digits (in memory) | imagenet | cub200 | dogs | folders "
                                         "(decoded per batch: see `loader`)")
    method_args: dict = param({}, doc="method hyper-parameters; unset ones take the method's (per-model) defaults")
    per_class: int | None = param(None, lo=1, doc="train images per class (subset); null = all")
    test_per_class: int | None = param(None, lo=1, doc="test images per class; null = all")
    classes: list[int] | None = param(None, lo=0, doc="keep only these classes (relabelled 0..k-1)")
    epochs: int = param(240, lo=1)
    batch_size: int = param(64, lo=1, doc="global batch (per rank = batch_size / world size); pairs for pair methods")
    lr: float | None = param(None, lo=0, lo_open=True, doc="initial LR; null = the model's default (0.05, ShuffleNets 0.01)")
    optimizer: str = param("sgd", choices=("sgd", "adamw"),
                           doc="sgd (momentum, nesterov, coupled weight_decay) | adamw (decoupled weight_decay, "
                               "betas (0.9, 0.999)); momentum and nesterov apply to sgd only")
    momentum: float = param(0.9, lo=0, hi=1, doc="SGD momentum (unused by adamw)")
    nesterov: bool = param(False, doc="SGD Nesterov momentum (refused with adamw)")
    weight_decay: float = param(5e-4, lo=0)
    lr_milestones: list[int] = param([150, 180, 210], lo=1, doc="LR x lr_decay after these epochs of a schedule_ref_epochs-long run")
    lr_decay: float = param(0.1, lo=0, hi=1, lo_open=True)
    lr_schedule: str = param("step", choices=("step", "cosine"),
                             doc="step = x lr_decay after each milestone; cosine = per-epoch cosine from lr to 0 "
                                 "over the epochs after warm-up (lr_milestones unused); see schedules.lr_at")
    warmup_epochs: int = param(0, lo=0, doc="linear warm-up (epoch e <= w trains at lr*e/w), in epochs of a "
                                            "schedule_ref_epochs-long run, scaled to `epochs` like the milestones")
    schedule_ref_epochs: int = param(240, lo=1, doc="epoch count the milestones (and IPS's p_r steps) are written for; scaled to `epochs`")
    seed: int = param(0, lo=0)
    precision: str = param("auto", choices=("auto", "fp32", "bf16"), doc="auto = bf16 autocast on CUDA, fp32 on CPU")
    channels_last: bool | None = param(None, doc="channels_last memory format; null = on for CUDA")
    compile: bool = param(False, doc="torch.compile the model")
    compile_backend: str = param("inductor", choices=("inductor", "aot_eager", "eager"),
                                 doc="torch.compile backend (aot_eager: tracing without code generation)")
    compile_mode: str = param("default", choices=("default", "reduce-overhead", "max-autotune",
                                                  "max-autotune-no-cudagraphs"),
                              doc="torch.compile mode (inductor only); reduce-overhead replays CUDA graphs "
                                  "(operational: same computation, launched differently)")
    sync_bn: bool = param(False, doc="SyncBatchNorm under DDP")
    eval_batch_size: int = param(1000, lo=1, doc="test-time batch size (operational: it does not change the result)")
    loader: str | None = param(None, choices=("memory", "folder", "ffcv"),
                               doc="memory: held on the device (CIFAR, digits); folder: torchvision decoding per batch; "
                                   "ffcv: .beton copies written by `ipsd data to-ffcv`; null = memory for in-memory "
                                   "datasets, folder for on-disk ones")
    image_size: int = param(224, lo=8, doc="train crop (RandomResizedCrop) and test centre crop of on-disk datasets "
                                           "(imagenet, cub200, dogs, folders); ignored by in-memory datasets (CIFAR, "
                                           "digits), which train at their native size")
    teacher_id: str | None = param(None, doc="set by resolution: 'run:<run id>' or 'sha256:<digest>' of the teacher")
    plugins: list[str] = param([], doc="modules that register methods from your own code: dotted module names "
                                       "(importable from the working directory or PYTHONPATH) or paths of .py files")
    plugin_ids: list[str] = param([], doc="set by resolution: '<module>@sha256:<digest of its source>' of the plugin "
                                          "that defines the run's method (empty for the suite's own methods)")
    teacher_tolerance: float = param(0.1, lo=0, doc="max |re-measured - recorded| teacher top-1 (points)")
    label_noise: float = param(0.0, lo=0, hi=1, doc="symmetric label noise: this fraction of the training labels (after "
                                                    "subsetting) flipped to another class, round(rate * N) of them "
                                                    "(ipsd.data.label_noise); test labels stay clean; allowed [0, 1)")
    label_noise_seed: int = param(0, lo=0, doc="seed of the flipped labels (the same for every method and seed of a "
                                               "run, so rows compare on one noisy set); unused without label_noise")
    # operational keys (not part of the identity)
    teacher: str | None = param(None, doc="teacher: a name in results/teachers.yaml, a run folder or a checkpoint")
    data_root: str | None = param(None, doc="folder holding the dataset; null = $IPSD_DATA")
    download: bool = param(False, doc="download the dataset through torchvision if missing")
    out: str = param("runs", doc="parent folder of run folders")
    device: str = param("auto", doc="auto | cpu | cuda | cuda:N")
    stop_after: int | None = param(None, lo=1, doc="stop cleanly after this many epochs of this invocation")
    progress: bool = param(True, doc="progress bars")
    deterministic: bool = param(False, doc="cuDNN deterministic kernels (slower)")
    threads: int | None = param(None, lo=1, doc="CPU runs: torch threads (null = torch's default, one per core); "
                                                 "recorded, and a resume under a different count is refused")
    workers: int | None = param(None, lo=0, doc="image-decoding workers of on-disk datasets: processes for "
                                "loader=folder (0 = in the training process; augmentation does not depend on it), threads "
                                "for loader=ffcv (at least 1); null = the CPUs this process may use, at most 8; unused by "
                                "in-memory datasets")
    ffcv_dir: str | None = param(None, doc="folder of the FFCV copy (train.beton, test.beton, meta.json); "
                                           "null = <data_root>/ffcv/<dataset>")

    def __post_init__(self) -> None:
        """Refuse key combinations no single-key range can express."""
        if self.optimizer != "sgd" and self.nesterov:
            raise ConfigError(f"nesterov=true needs optimizer=sgd (Nesterov momentum is an SGD option); "
                              f"remove nesterov or use optimizer=sgd instead of {self.optimizer}")
        if self.compile_mode != "default" and self.compile_backend != "inductor":
            raise ConfigError(f"compile_mode={self.compile_mode!r} needs compile_backend=inductor (the other backends "
                              f"take no mode); remove compile_mode or use compile_backend=inductor")
        if isinstance(self.label_noise, (int, float)) and not 0 <= self.label_noise < 1:  # 1: no true label left
            raise ConfigError(f"label_noise={self.label_noise!r} is out of range; allowed [0, 1)")
        if self.warmup_epochs >= self.schedule_ref_epochs > 0:  # (ref <= 0 is refused by its own range)
            raise ConfigError(f"warmup_epochs={self.warmup_epochs} is out of range: the warm-up must end before the "
                              f"{self.schedule_ref_epochs}-epoch schedule does; allowed [0, {self.schedule_ref_epochs - 1}]")

    def identity(self) -> dict[str, Any]:
        """What the run computes: every key except the operational ones (and, for a run resolved to the in-memory
        loader, the on-disk-only keys)."""
        d = to_dict(self)
        for k in OPERATIONAL_KEYS + (ON_DISK_KEYS if self.loader == "memory" else ()):
            d.pop(k)
        if not d["plugin_ids"]:  # runs of the suite's own methods keep the identity they had before plugins existed
            d.pop("plugin_ids")
        if not d["label_noise"]:  # runs on clean labels keep the identity they had before label noise existed
            d.pop("label_noise")
            d.pop("label_noise_seed")
        return d


def parse_value(text: str) -> Any:
    """Parse a command-line value the way YAML would (1 -> int, 0.5 -> float, [1,2] -> list)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings over ``values`` (e.g. a YAML file's); ``method_args.T=2`` sets a nested key.

    Overrides replace what ``values`` holds, but never each other: a key given twice, or a mapping given whole
    after one of its keys (``method_args.T=3 method_args={...}`` would drop T), is an error naming both."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    given: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        clash = next((k for k in given if k == key or k.startswith(key + ".")), None)
        if clash is not None:
            hint = f" (set nested keys one by one, e.g. {key}.NAME=VALUE)" if clash != key else ""
            raise ConfigError(f"{key!r} is given twice: {given[clash]!r} and then {item!r}; give each key once{hint}")
        given[key] = item
        *parents, leaf = key.split(".")
        node = values
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {key!r}: {p!r} is not a mapping")
        node[leaf] = parse_value(text)
    return values


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}, column {key_node.start_mark.column + 1}: "
                                  f"key {key!r} is given twice (first on line {seen[key].line + 1}); give it once")
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML file of ``key: value``; a missing, unreadable or malformed file is a ConfigError naming the file
    (and the line and column of the fault)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist" +
                          (" (it is a folder)" if path.is_dir() else ""))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the config ({type(e).__name__}: {e}); check its permissions") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}not valid YAML ({getattr(e, 'problem', None) or e}); fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of key: value")
    return data


def load_run_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (optional) then command-line overrides -> validated RunConfig (not yet resolved)."""
    values = load_yaml(path) if path else {}
    return build(RunConfig, apply_overrides(values, list(overrides)))
