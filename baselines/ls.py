"""Label Smoothing [Szegedy et al. 2016]: cross-entropy to a smoothed one-hot target.

Two forms exist in the baseline code bases: the standard one, (1-eps) one-hot + eps/C on every
class (OLS repo; = ``F.cross_entropy(label_smoothing=eps)``), the default, and the TF-KD repo's,
1-eps on the target and eps/(C-1) on each other class (``form=others``); at C = 100 they differ
negligibly. No detach, no state.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ipsd.config import ConfigError, param
from ipsd.losses import soft_ce
from ipsd.method import Method, Setup, register_method


@dataclass
class LSConfig:
    eps: float = param(0.1, lo=0, hi=1, doc="smoothing mass taken from the true class")
    form: str = param("uniform", choices=("uniform", "others"),
                      doc="uniform: (1-eps) one-hot + eps/C (standard, the default); "
                          "others: 1-eps on the target, eps/(C-1) elsewhere (TF-KD repo)")


def smoothed_targets(y: Tensor, num_classes: int, eps: float, form: str) -> Tensor:
    """(B, C) fp32 target distribution of label smoothing."""
    if form == "uniform":
        off, on = eps / num_classes, 1.0 - eps + eps / num_classes
    else:
        off, on = eps / (num_classes - 1), 1.0 - eps
    t = torch.full((len(y), num_classes), off, device=y.device, dtype=torch.float32)
    return t.scatter_(1, y[:, None], on)


@register_method("ls")
class LabelSmoothing(Method):
    Config = LSConfig

    def __init__(self, cfg: LSConfig, setup: Setup):
        super().__init__(cfg, setup)
        if cfg.form == "others" and setup.num_classes < 2:
            raise ConfigError("method_args.form='others' needs at least 2 classes")

    def forward(self, model, batch, step):
        z = model(batch.x)
        return {"ce": soft_ce(smoothed_targets(batch.y, z.shape[1], self.cfg.eps, self.cfg.form), z)}
