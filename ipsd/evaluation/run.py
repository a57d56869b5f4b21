"""``ipsd evaluate RUN --suite safety|attack|corruption``: the IPS paper's robustness and calibration measurements
(Tables 10-12) on a finished run's model.

The model is rebuilt from the run's recorded config and final checkpoint (``ipsd.teacher.load_teacher``: strict
load, frozen, eval mode) and measured in fp32 on the run's own test split (its recorded dataset, classes and
test_per_class, through the engine's ``load_data``; the test labels are never noised). Each suite writes
``eval/<suite>.json`` in the run folder (``RunFolder.write_eval``, atomic) with every setting used and flat
``metrics``, named as in the paper CSVs where those have the metric:

* safety: ``safety_metrics`` -- accuracy_%, AURC_x1e3, EAURC_x1e3, FPR_x1e2, ECE_x1e2, Brier_x1e2, NLL.
* attack: untargeted white-box FGSM (one step of eps) and I-FGSM (``steps`` steps of eps / steps) at each eps --
  FGSM_eps<e>_acc_%, IFGSM_eps<e>_acc_% (e printed with %g: eps0, eps0.001, ...); eps 0 is the clean accuracy.
* corruption: the ten CIFAR-C corruptions x severities -- acc_<name>_s<k>_%, the mean over severities acc_<name>_%
  and its error err_<name>_% (100 - acc: the paper's Table 11 per-type values are error rates, though its caption
  says accuracies), and over corruptions acc_mean_% / err_mean_%. Images: the official CIFAR-10-C / CIFAR-100-C
  files under the data root when every requested corruption is there (``source=auto``), else generated
  (``ipsd.evaluation.corruptions``): for the whole test set through ``load_or_make``'s checksummed cache under the
  data root; for a test subset the cache's rows when it exists, else generated for those images only (per-image
  seeds by test-set index, so they are the cache's rows either way).

A finished evaluation is not redone unless ``force``; one made with other settings is refused with that hint.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import RunConfig, build
from ..errors import ConfigError, DataError, IpsdError
from ..runs import EvalRecord, RunFolder, git_commit
from .attacks import EPS_LIST, attack_accuracy, normalise, to_unit
from .corruptions import (CORRUPTIONS, GENERATOR_VERSION, OFFICIAL_DIRS, SEVERITIES, corrupt, generated_path,
                          load_or_make, official_path, read_official, to_nhwc)
from .safety import ECE_BINS, TPR_LEVEL, safety_metrics
from . import SUITES
SOURCES = ("auto", "official", "generated")
ATTACKS = ("fgsm", "ifgsm")
PRECISION = "fp32"  # evaluation precision whatever the run trained in (bf16 autocast on CUDA)


@dataclass(frozen=True)
class EvalSettings:
    """What a suite measures with (the defaults are the paper's tables')."""

    bins: int = ECE_BINS  # safety: ECE bins
    eps: tuple[float, ...] = EPS_LIST  # attack: L-inf radii in [0, 1] pixel units
    steps: int = 10  # attack: I-FGSM steps, each of eps / steps
    corruptions: tuple[str, ...] = CORRUPTIONS
    severities: tuple[int, ...] = SEVERITIES
    source: str = "auto"  # corruption: auto | official | generated

    def __post_init__(self) -> None:
        if self.bins < 1:
            raise ConfigError(f"bins={self.bins} is out of range; allowed [1, inf]")
        if not self.eps or any(not (isinstance(e, (int, float)) and 0 <= e <= 1) for e in self.eps):
            raise ConfigError(f"eps={list(self.eps)} is out of range; give one or more values in [0, 1]")
        if self.steps < 1:
            raise ConfigError(f"steps={self.steps} is out of range; allowed [1, inf]")
        bad = [c for c in self.corruptions if c not in CORRUPTIONS]
        if bad or not self.corruptions:
            raise ConfigError(f"unknown corruption(s) {bad or '(none given)'}; choose from {', '.join(CORRUPTIONS)}")
        if not self.severities or any(s not in SEVERITIES for s in self.severities):
            raise ConfigError(f"severities={list(self.severities)} is out of range; choose from 1-5")
        if self.source not in SOURCES:
            raise ConfigError(f"source={self.source!r} is not allowed; use one of {', '.join(SOURCES)}")


def eps_label(eps: float) -> str:
    """The paper CSVs' spelling of an eps: 0, 0.001, 0.01, 0.05 (%g)."""
    return f"{float(eps):g}"


# ----------------------------------------------------------------------------------------------------- the run
def _run_config(run: RunFolder, data_root: str | None) -> RunConfig:
    """The finished run's recorded config, with ``data_root`` (else the recorded one, else $IPSD_DATA)."""
    if not run.path.is_dir():
        raise ConfigError(f"evaluate: {run.path} is not a run folder; give the folder `ipsd train` printed")
    if run.read_result() is None:
        raise ConfigError(f"evaluate: run {run.path} is not finished (no result.json); finish it first by re-running "
                          "its `ipsd train` command (it resumes)")
    recorded = run.read_config()
    cfg = build(RunConfig, {**recorded, "data_root": data_root or recorded.get("data_root"), "progress": False})
    if cfg.loader != "memory":
        raise ConfigError(f"evaluate: run {run.run_id} reads {cfg.dataset} from disk; the suites need an in-memory "
                          "dataset (cifar10, cifar100, digits)")
    return cfg


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r}: no CUDA device is visible here; use device=cpu")
    return device


def _model(run: RunFolder, device: torch.device) -> nn.Module:
    from ..teacher import load_teacher

    try:
        model, _ = load_teacher(run.path, device)
    except ConfigError as e:
        raise ConfigError(f"evaluate: {e}") from None
    return model


def _root(cfg: RunConfig) -> Path | None:
    from ..data import resolve_root

    return resolve_root(cfg.data_root)


def _source(cfg: RunConfig, s: EvalSettings) -> str:
    """``official`` or ``generated``: what ``s.source`` means for this run's dataset and data root."""
    root = _root(cfg)
    missing = [c for c in s.corruptions if root is None or official_path(root, cfg.dataset, c) is None]
    if s.source == "official" and missing:
        where = (f"{root}/{OFFICIAL_DIRS[cfg.dataset]}" if root is not None and cfg.dataset in OFFICIAL_DIRS
                 else f"no official corrupted test set for dataset={cfg.dataset} at data_root={root}")
        raise DataError(f"source=official: {', '.join(missing)} missing ({where}); download CIFAR-10-C / CIFAR-100-C "
                        "(Zenodo) into the data root, or use source=auto|generated")
    return "generated" if (s.source == "generated" or missing) else "official"


def _wanted(suite: str, cfg: RunConfig, s: EvalSettings) -> dict[str, Any]:
    """The settings that decide a suite's numbers (a recorded evaluation with other ones is not reused)."""
    common = {"dataset": cfg.dataset, "classes": cfg.classes, "test_per_class": cfg.test_per_class,
              "precision": PRECISION}
    if suite == "safety":
        return {**common, "ECE_bins": s.bins, "TPR_level": TPR_LEVEL}
    if suite == "attack":
        return {**common, "attacks": list(ATTACKS), "eps": [float(e) for e in s.eps], "ifgsm_steps": s.steps,
                "ifgsm_step_size": "eps/steps", "fgsm_step_size": "eps", "space": "[0, 1] pixels, L-inf"}
    if suite == "corruption":
        source = _source(cfg, s)
        return {**common, "corruptions": list(s.corruptions), "severities": list(s.severities), "source": source,
                **({"generator_version": GENERATOR_VERSION} if source == "generated" else {})}
    raise ConfigError(f"unknown suite {suite!r}; use one of {', '.join(SUITES)}")


# ---------------------------------------------------------------------------------------------- measurements
@torch.no_grad()
def logits_of(model: nn.Module, images: Tensor, mean, std, device: torch.device, batch_size: int) -> Tensor:
    """fp32 logits (N, C) on the CPU of uint8 (N, 3, H, W) ``images``, normalised by the run's mean/std."""
    out = []
    for start in range(0, images.shape[0], batch_size):
        x = normalise(to_unit(images[start:start + batch_size]).to(device), mean, std)
        out.append(model(x).float().cpu())
    return torch.cat(out)


def _safety(model, data, s: EvalSettings, device, batch_size) -> dict[str, float]:
    m = safety_metrics(logits_of(model, data.test_x, data.mean, data.std, device, batch_size), data.test_y, s.bins)
    return {k: v for k, v in m.items() if k not in ("ECE_bins", "TPR_level", "n")}


def _attack(model, data, s: EvalSettings, device, batch_size) -> dict[str, float]:
    metrics = {}
    for method in ATTACKS:
        r = attack_accuracy(model, data.test_x, data.test_y, data.mean, data.std, s.eps, method, s.steps, None,
                            batch_size)
        metrics.update({f"{method.upper()}_eps{eps_label(e)}_acc_%": acc for e, acc in r["accuracy_%"].items()})
    return metrics


def _test_indices(cfg: RunConfig, data):
    """The full test set (uint8 NHWC), its labels, and the positions of the run's test images in it."""
    from ..data.datasets import subset_selection
    from ..engine import load_data

    full = load_data(dataclasses.replace(cfg, per_class=None, classes=None, test_per_class=None, label_noise=0.0))
    _, te, _ = subset_selection(full, cfg.per_class, cfg.classes, cfg.test_per_class)
    if not torch.equal(full.test_x[te], data.test_x):  # the run's test split is these rows of the full one
        raise AssertionError("the run's test split is not a selection of the full test set")
    return to_nhwc(full.test_x), full.test_y.numpy(), te.numpy()


def _corrupted(cfg: RunConfig, source: str, name: str, severity: int, full_x: np.ndarray, full_y: np.ndarray,
               te: np.ndarray) -> np.ndarray:
    """uint8 NHWC corrupted copies of the run's test images (rows ``te`` of the full test set)."""
    root = _root(cfg)
    if source == "official":
        images, labels = read_official(root, cfg.dataset, name, severity)
        if images.shape[0] != full_x.shape[0] or not np.array_equal(labels[te], full_y[te]):
            raise DataError(f"{root}/{OFFICIAL_DIRS[cfg.dataset]}/labels.npy does not match the {cfg.dataset} test "
                            "labels in order; the files belong to another test set: replace them, or use "
                            "source=generated")
        return images[te]
    whole = len(te) == full_x.shape[0]
    if root is not None and (whole or generated_path(root, cfg.dataset, name, severity).is_file()):
        return load_or_make(root, cfg.dataset, name, severity, full_x, prefer_official=False)[te]
    return corrupt(full_x[te], name, severity, indices=te)


def _corruption(model, data, cfg: RunConfig, s: EvalSettings, source: str, device, batch_size) -> dict[str, float]:
    full_x, full_y, te = _test_indices(cfg, data)
    y = data.test_y
    metrics: dict[str, float] = {}
    per_name = []
    for name in s.corruptions:
        accs = []
        for severity in s.severities:
            images = torch.from_numpy(_corrupted(cfg, source, name, severity, full_x, full_y, te)).permute(0, 3, 1, 2)
            pred = logits_of(model, images.contiguous(), data.mean, data.std, device, batch_size).argmax(1)
            acc = 100.0 * float((pred == y).double().mean())
            metrics[f"acc_{name}_s{severity}_%"] = acc
            accs.append(acc)
        mean = sum(accs) / len(accs)
        metrics[f"acc_{name}_%"], metrics[f"err_{name}_%"] = mean, 100.0 - mean
        per_name.append(mean)
        print(f"evaluate corruption: {name} {mean:.2f}% (severities {', '.join(f'{a:.1f}' for a in accs)})",
              file=sys.stderr)
    overall = sum(per_name) / len(per_name)
    metrics["acc_mean_%"], metrics["err_mean_%"] = overall, 100.0 - overall
    return metrics


# ---------------------------------------------------------------------------------------------------- the API
def evaluate_run(run: str | Path | RunFolder, suite: str, settings: EvalSettings = EvalSettings(),
                 data_root: str | None = None, device: str = "auto", batch_size: int = 500,
                 force: bool = False) -> tuple[EvalRecord, bool]:
    """Measure ``suite`` on the finished run ``run`` and write ``eval/<suite>.json``; returns (the record, whether it
    was computed now). An existing record with the same settings is returned as it is, unless ``force``."""
    folder = run if isinstance(run, RunFolder) else RunFolder(Path(run).expanduser())
    if suite not in SUITES:
        raise ConfigError(f"unknown suite {suite!r}; use one of {', '.join(SUITES)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} is out of range; allowed [1, inf]")
    cfg = _run_config(folder, data_root)
    wanted = _wanted(suite, cfg, settings)
    existing = folder.read_eval(suite)
    if existing is not None and not force:
        made = existing.settings
        diff = {k: (made.get(k), v) for k, v in wanted.items() if made.get(k) != v}
        if not diff:
            return existing, False
        text = "; ".join(f"{k} {a!r} there, {b!r} asked" for k, (a, b) in diff.items())
        raise ConfigError(f"{folder.eval_path(suite)} was made with other settings ({text}); pass --force "
                          "(force=True) to redo it with these")
    from ..engine import load_data

    dev = _device(device)
    start = time.perf_counter()
    data = load_data(cfg)
    model = _model(folder, dev)
    if suite == "safety":
        metrics = _safety(model, data, settings, dev, batch_size)
    elif suite == "attack":
        metrics = _attack(model, data, settings, dev, batch_size)
    else:
        metrics = _corruption(model, data, cfg, settings, wanted["source"], dev, batch_size)
    record = folder.read_result()
    root = _root(cfg)
    result = {
        "run_id": folder.run_id, "method": cfg.method, "model": cfg.model,
        "settings": {**wanted, "n": int(data.test_y.numel()), "model_eval_mode": True,
                     "checkpoint": "final (last epoch)"},
        "metrics": metrics,
        "recorded_top1": record.top1("last"),  # the run's own last-epoch test top-1 (result.json), for comparison
        "operational": {"device": str(dev), "batch_size": batch_size, "data_root": str(root) if root else None,
                        "seconds": time.perf_counter() - start, "git_commit": git_commit()},
    }
    folder.write_eval(suite, result)
    return folder.read_eval(suite), True


def pending(folder: RunFolder, suites: Sequence[str]) -> list[str]:
    """The suites a finished run has no evaluation of yet (none for an unfinished run)."""
    if folder.status() != "done":
        return []
    return [s for s in suites if folder.read_eval(s) is None]


def evaluate_runs(jobs: Sequence[tuple[str, RunFolder, str | None, str]], suites: Sequence[str],
                  dry_run: bool = False) -> list[str]:
    """A sweep's evaluations: ``jobs`` are (label, run folder, data_root, device); each finished run lacking a suite
    is evaluated with the default settings. Prints the plan; returns one line per failure (label, folder, reason)."""
    bad = [s for s in suites if s not in SUITES]
    if bad:
        raise ConfigError(f"evaluate: unknown suite(s) {bad}; use {', '.join(SUITES)}")
    todo = [(job, pending(job[1], suites)) for job in jobs]
    todo = [(job, missing) for job, missing in todo if missing]
    count = sum(len(m) for _, m in todo)
    print(f"evaluate [{', '.join(suites)}]: {count} evaluation(s) of {len(todo)} finished run(s) to do", flush=True)
    failures = []
    if dry_run:
        return failures
    for (label, folder, data_root, device), missing in todo:
        for suite in missing:
            try:
                rec, _ = evaluate_run(folder, suite, data_root=data_root, device=device)
                print(f"evaluated {label}: {suite} -> {rec.path}", flush=True)
            except IpsdError as e:
                failures.append(f"  {label} in {folder.path}: evaluate {suite}: {e}")
    return failures


def summary(rec: EvalRecord) -> str:
    """One line of a suite's headline numbers."""
    m = rec.metrics
    if rec.suite == "safety":
        keys = ["accuracy_%", "AURC_x1e3", "EAURC_x1e3", "FPR_x1e2", "ECE_x1e2", "Brier_x1e2", "NLL"]
    elif rec.suite == "attack":
        keys = [k for k in m if k.endswith("_acc_%")]
    else:
        keys = ["acc_mean_%", "err_mean_%", *(f"err_{c}_%" for c in rec.settings.get("corruptions", ()))]
    return ", ".join(f"{k} {m[k]:.2f}" for k in keys if k in m and not math.isnan(m[k]))
