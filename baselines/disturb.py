"""DisturbLabel [Xie et al. CVPR 2016]: noisy labels re-drawn every step, then CE.

Each step, independently per sample, with probability alpha the label is replaced by a uniform draw
over all C classes (which may give back the true class), so the effective flip rate is alpha(C-1)/C.
The OLS repo's form (flip to a uniformly chosen *other* class with probability alpha(C-1)/C) has the
same label distribution. Labels are never corrupted persistently; all draws come from
``step.generator`` (per epoch and rank), so runs and resumes are deterministic.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ipsd.config import param
from ipsd.losses import ce
from ipsd.method import Method, register_method


@dataclass
class DisturbConfig:
    alpha: float = param(0.1, lo=0, hi=1, doc="probability of re-drawing a label uniformly over all C classes "
                                              "(OLS re-implementation; flip rate alpha(C-1)/C)")


def disturb_labels(y: Tensor, num_classes: int, alpha: float, g: torch.Generator) -> Tensor:
    """Labels with each one replaced, with probability alpha, by a uniform class (a fixed number of draws)."""
    replace = torch.rand(len(y), generator=g, device=y.device) < alpha
    uniform = torch.randint(0, num_classes, (len(y),), generator=g, device=y.device)
    return torch.where(replace, uniform, y)


@register_method("disturb")
class DisturbLabel(Method):
    Config = DisturbConfig

    def forward(self, model, batch, step):
        z = model(batch.x)
        return {"ce": ce(z, disturb_labels(batch.y, z.shape[1], self.cfg.alpha, step.generator))}
