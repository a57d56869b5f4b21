"""1-D interpolation between two finished runs' weights (Keskar et al.'s plot, the IPS paper's Table 1 analysis).

Along theta(t) = (1 - t) theta_a + t theta_b the BatchNorm statistics of neither end fit, so at each t they are
recomputed: running statistics reset, then one no-grad pass over the training set in train mode with a cumulative
average (BatchNorm momentum None). By default that pass sees the images as training saw them (random crop + flip,
shuffled batches of the run's batch size, from a fixed seed, the same at every t): statistics of clean images do not
fit weights trained on augmented ones, and put both ends a few points below the runs' own test top-1. ``bn_batches
= "clean"`` is the alternative (the stored images in order, at the eval batch size). Then train and test loss (mean
cross-entropy) and top-1 are measured in eval mode on clean images. Both runs must be the same architecture on the
same data; ``t`` outside [0, 1] extrapolates.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..rng import generator
from ..runs import RunFolder, atomic_write_json

DATA_KEYS = ("dataset", "model", "classes", "per_class", "test_per_class")
BN_BATCHES = ("augmented", "clean")


def _blend(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """(1 - t) a + t b for floating-point entries; integer entries (BatchNorm's step count) are taken from a."""
    return {k: (1 - t) * a[k] + t * b[k] if a[k].is_floating_point() else a[k] for k in a}


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches) -> None:
    """Running statistics of every BatchNorm layer from scratch, as the exact average over ``batches``."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch weighs the same
    model.train()
    for x, _ in batches:
        model(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()


def augmented_train_batches(loader, batch_size: int, seed: int):
    """One pass over the training set as trained: a seeded shuffle into batches of ``batch_size``, each image
    randomly cropped and flipped by the loader's own train transform. The same seed gives the same batches."""
    g = generator(loader.device, "interpolate-batchnorm", seed)
    order = torch.randperm(len(loader.train_y), generator=g, device=loader.device)
    for idx in order.split(batch_size):
        if len(idx) > 1:  # a one-image batch has no batch variance (train-mode BatchNorm refuses it)
            yield loader.augment(idx, g), loader.train_y[idx]


@torch.no_grad()
def loss_and_top1(model: nn.Module, batches) -> tuple[float, float]:
    loss = correct = n = 0.0
    for x, y in batches:
        z = model(x).float()
        loss += F.cross_entropy(z, y, reduction="sum").item()
        correct += (z.argmax(1) == y).sum().item()
        n += len(y)
    return loss / n, 100 * correct / n


def interpolate(run_a: str | Path, run_b: str | Path, points: int = 11, lo: float = 0.0, hi: float = 1.0,
                data_root: str | None = None, bn_batches: str = "augmented") -> dict[str, Any]:
    """Train/test loss and top-1 along the line from run A's final weights (t = 0) to run B's (t = 1)."""
    from ..config import build, RunConfig
    from ..engine import load_data
    from ..data.batch import Needs
    from ..data.loader import DeviceLoader
    from ..teacher import load_teacher

    if bn_batches not in BN_BATCHES:
        raise ConfigError(f"interpolate: bn_batches must be one of {', '.join(BN_BATCHES)}, not {bn_batches!r}")
    folders = [RunFolder(Path(r)) for r in (run_a, run_b)]
    configs = [f.read_config() for f in folders]
    for key in DATA_KEYS:
        if configs[0].get(key) != configs[1].get(key):
            raise ConfigError(f"interpolate: the runs differ in {key} ({configs[0].get(key)!r} vs "
                              f"{configs[1].get(key)!r}); both must be the same model on the same data")
    nets = [load_teacher(f.path)[0] for f in folders]
    cfg = build(RunConfig, {**configs[0], "data_root": data_root or configs[0].get("data_root"), "progress": False})
    if cfg.loader != "memory":
        raise ConfigError("interpolate: on-disk datasets are not supported (the clean train pass needs the in-memory "
                          "loader)")
    data = load_data(cfg)
    loader = DeviceLoader(data, torch.device("cpu"), cfg.batch_size, Needs(), cfg.seed)
    model = copy.deepcopy(nets[0])
    a, b = (n.state_dict() for n in nets)
    ts = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    rows = []
    for i, t in enumerate(ts):
        model.load_state_dict(_blend(a, b, t))
        recompute_batchnorm(model, augmented_train_batches(loader, cfg.batch_size, cfg.seed) if bn_batches == "augmented"
                            else loader.clean_train_batches(cfg.eval_batch_size))
        train_loss, train_top1 = loss_and_top1(model, loader.clean_train_batches(cfg.eval_batch_size))
        test_loss, test_top1 = loss_and_top1(model, loader.test_batches(cfg.eval_batch_size))
        rows.append({"t": t, "train_loss": train_loss, "train_top1": train_top1, "test_loss": test_loss,
                     "test_top1": test_top1})
        print(f"interpolate {i + 1}/{points}: t={t:.2f} train {train_top1:.2f}% test {test_top1:.2f}%",
              file=sys.stderr)
    return {"run_a": str(folders[0].path), "run_b": str(folders[1].path), "method_a": configs[0].get("method"),
            "method_b": configs[1].get("method"), "method_args_a": configs[0].get("method_args"),
            "method_args_b": configs[1].get("method_args"), "points": rows,
            "bn_batches": bn_batches,
            "batchnorm": ("recomputed at every t: cumulative average over one pass of the training set, "
                          + (f"random crop + flip in shuffled batches of {cfg.batch_size} (seeded, the same at every t)"
                             if bn_batches == "augmented" else f"clean images in order, batches of "
                             f"{cfg.eval_batch_size}"))}


def draw(result: dict[str, Any], path: str | Path, label_a: str = "A", label_b: str = "B") -> Path:
    """Loss (left axis, log scale) and top-1 (right axis) against t, train solid and test dashed; writes the PNG and
    the numbers beside it as JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pts = result["points"]
    t = [p["t"] for p in pts]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.plot(t, [p["train_loss"] for p in pts], "b-", label="train loss")
    ax.plot(t, [p["test_loss"] for p in pts], "b--", label="test loss")
    ax.set_yscale("log")
    ax.set_xlabel(f"t  (0 = {label_a}, 1 = {label_b})")
    ax.set_ylabel("cross-entropy", color="b")
    acc = ax.twinx()
    acc.plot(t, [p["train_top1"] for p in pts], "r-", label="train top-1")
    acc.plot(t, [p["test_top1"] for p in pts], "r--", label="test top-1")
    acc.set_ylabel("top-1 (%)", color="r")
    handles = ax.get_legend_handles_labels()[0] + acc.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="center left")
    ax.set_title("1-D interpolation (1 - t)·θ_A + t·θ_B, BatchNorm recomputed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    atomic_write_json(path.with_suffix(".json"), result)
    return path
