"""Frozen pretrained teachers (TF-KD_self, KD, AT, SP, RKD, CRD, VRM): load a finished run's model and
keep it out of everything the engine trains, moves, checkpoints or synchronises. References (registry
names, run folders, checksums) are resolved by ``ipsd.teacher_registry``.

A teacher reference is a run folder written by ``ipsd train`` (``config.yaml`` + ``checkpoint.pt``,
optionally ``result.json``) or the path of such a folder's ``checkpoint.pt``. The architecture is
rebuilt from the run's own recorded config, never guessed from the caller, so a checkpoint can only
be loaded into the model that produced it (strict ``load_state_dict``).
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .config import ConfigError
from .models import MODELS, Backbone, Features, build_model
from .runs import CONFIG_FILE, RecordError, load_checkpoint_file
from .teacher_registry import locate, resolve_ref, sha256_file


def _num_classes(weights: dict[str, Tensor], run_cfg: dict[str, Any], where: str) -> int:
    """Classes of the teacher's head: from the checkpoint, cross-checked with a recorded ``classes`` list."""
    head = weights.get("classifier.weight")
    if head is None or head.dim() != 2:
        raise ConfigError(f"teacher {where}: checkpoint has no 'classifier.weight'; not an ipsd model checkpoint")
    n = int(head.shape[0])
    classes = run_cfg.get("classes")
    if classes is not None and len(classes) != n:
        raise ConfigError(f"teacher {where}: config.yaml keeps {len(classes)} classes but the checkpoint head has {n}")
    return n


def load_teacher(ref: str | Path, device: torch.device | str | None = None, *, model: str | None = None,
                 num_classes: int | None = None, sha256: str | None = None) -> tuple[Backbone, dict[str, Any]]:
    """Build the model from the run's recorded ``config.yaml``, load the checkpoint's ``model`` weights
    strictly, and return it frozen (eval mode, ``requires_grad=False``) with a provenance record.

    ``model`` / ``num_classes`` / ``sha256``, when given, are what the caller requires; a teacher that
    differs is refused with a :class:`ConfigError` (checked before any weight is loaded where possible).
    ``info``: path, run_dir, model, dataset, num_classes, sha256, top1 (``result.json`` final top-1, else
    None), complete (whether ``result.json`` exists), epoch (epochs trained), epochs (epochs planned).
    """
    folder, ckpt_path = locate(ref)
    where = repr(str(ref))
    run_cfg = folder.read_config()
    name = str(run_cfg.get("model", ""))
    if name not in MODELS:
        raise ConfigError(f"teacher {where}: {CONFIG_FILE} names model {name!r}, which is not a registered model")
    name = MODELS.get(name).name
    if model is not None and MODELS.get(model).name != name:
        raise ConfigError(f"teacher {where} is a {name}, but this method needs a teacher of the student's "
                          f"architecture ({model}); train one with `ipsd train method=hard model={model} ...`")
    digest = sha256_file(ckpt_path)
    if sha256 is not None and digest != sha256.lower():
        raise ConfigError(f"teacher {where}: {ckpt_path.name} has sha256 {digest}, not the pinned {sha256}")

    try:
        ckpt = load_checkpoint_file(ckpt_path, "cpu", weights_only=True)
    except RecordError as e:
        raise ConfigError(f"teacher {where}: {e}") from None
    weights = ckpt["model"]
    n = _num_classes(weights, run_cfg, where)
    if num_classes is not None and n != num_classes:
        raise ConfigError(f"teacher {where} predicts {n} classes but the student's data has {num_classes}; "
                          f"train the teacher on the same dataset/classes")
    with torch.random.fork_rng(devices=[]):  # building initialises weights: leave the caller's RNG untouched
        net = build_model(name, n)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise ConfigError(f"teacher {where}: checkpoint does not fit a {name}: {e}") from None
    net.eval().requires_grad_(False)
    if device is not None:
        net.to(device)

    result = folder.read_result()
    epochs_done = (ckpt.get("state") or {}).get("epoch")
    info = {
        "path": str(ckpt_path.resolve()), "run_dir": str(folder.path.resolve()), "model": name,
        "dataset": run_cfg.get("dataset"), "num_classes": n, "sha256": digest,
        "top1": result.top1("last") if result else None, "complete": result is not None,
        "epoch": epochs_done, "epochs": run_cfg.get("epochs"),
    }
    if result is None:
        warnings.warn(f"teacher {where} has no finished record: its run is unfinished "
                      f"(epoch {epochs_done} of {run_cfg.get('epochs')})", stacklevel=2)
    return net, info


class FrozenTeacher:
    """A teacher held OUTSIDE ``nn.Module`` registration (a plain object, not a submodule).

    Assigned as an attribute of a method it is therefore not in ``method.parameters()`` (so not in the
    optimizer), not in ``method.state_dict()`` (so not in the run's checkpoint, which stays small and
    resumable), not moved by ``method.to``, not switched to train mode by ``method.train()``, and not
    seen by DDP (no broadcast, no gradient hooks). It runs in eval mode under ``no_grad`` and moves
    itself to the batch's device (and memory format) on first use.
    """

    def __init__(self, model: nn.Module, info: dict[str, Any] | None = None):
        self.model = model.eval().requires_grad_(False)
        self.info = dict(info or {})

    @classmethod
    def load(cls, ref: str | Path, **expect: Any) -> FrozenTeacher:
        """``load_teacher(ref, **expect)`` wrapped; weights stay on the CPU until the first batch."""
        return cls(*load_teacher(ref, **expect))

    def _place(self, x: Tensor) -> None:
        first = next(self.model.parameters(), None)
        if first is not None and first.device != x.device:
            channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
            self.model.to(x.device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        if self.model.training:  # someone called .train() on it directly: undo
            self.model.eval()

    def __call__(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, Features]:
        """Teacher logits (or ``(logits, Features)``) for ``x``, without gradient."""
        self._place(x)
        with torch.no_grad():
            return self.model(x, features=features)

    def __repr__(self) -> str:
        return f"FrozenTeacher({self.info.get('model')}, sha256={str(self.info.get('sha256'))[:12]})"


SAME_DATA_KEYS = ("dataset", "classes", "test_per_class")


def load_run_teacher(cfg: Any, data: Any, device: torch.device) -> FrozenTeacher:
    """The run's teacher, frozen on ``device``: checksum verified against the registry, trained on the same
    data (dataset, classes, test split), finished; its test accuracy is re-measured by the engine next."""
    path, entry = resolve_ref(cfg.teacher)
    teacher = FrozenTeacher.load(path, num_classes=data.num_classes, sha256=(entry or {}).get("sha256"))
    folder, _ = locate(path)
    recorded = folder.read_config()
    for key in SAME_DATA_KEYS:
        if recorded.get(key) != getattr(cfg, key):
            raise ConfigError(f"teacher {cfg.teacher!r} was trained with {key}={recorded.get(key)!r} but this run has "
                              f"{key}={getattr(cfg, key)!r}; a teacher must see the student's dataset and test split")
    top1 = (entry or {}).get("top1", teacher.info["top1"])
    if top1 is None:
        raise ConfigError(f"teacher {cfg.teacher!r} is unfinished (no result.json): finish its run first")
    teacher.info.update(ref=cfg.teacher, name=cfg.teacher if entry else None, top1=top1)
    teacher.model.to(device)
    return teacher


def verify_teacher(teacher: FrozenTeacher, measured_top1: float, tolerance: float) -> None:
    """Stop before training if the teacher's re-measured test accuracy is not the recorded one."""
    teacher.info["measured_top1"] = measured_top1
    recorded = teacher.info["top1"]
    if abs(measured_top1 - recorded) > tolerance:
        raise ConfigError(f"teacher {teacher.info.get('ref')!r}: re-measured test top-1 {measured_top1:.2f} differs "
                          f"from the recorded {recorded:.2f} by more than teacher_tolerance={tolerance}; wrong "
                          f"checkpoint, data or normalisation?")


def require_teacher(setup: Any, method: str) -> FrozenTeacher:
    """The run's teacher (``setup.teacher``); refuse to build a teacher-based method without one."""
    if setup.teacher is None:
        raise ConfigError(f"method {method!r} needs a teacher: pass teacher=<name in results/teachers.yaml | "
                          f"run folder of a finished `ipsd train method=hard ...` | its checkpoint.pt>")
    return setup.teacher
