"""Epoch-wise schedules (1-indexed epochs, as in RepDistiller's loop).

Shorter runs keep the paper's shape: every boundary written for a ``ref``-epoch run (240 on CIFAR)
is scaled to ``round(b * epochs / ref)``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence


def scale_boundaries(boundaries: list[int], epochs: int, ref: int) -> list[int]:
    return [round(b * epochs / ref) for b in boundaries]


def step_lr(base: float, epoch: int, milestones: list[int], decay: float) -> float:
    """LR for 1-indexed ``epoch``: ``base * decay ** #{m : epoch > m}`` (150/180/210 -> 0.05, 5e-3, ...)."""
    return base * decay ** sum(epoch > m for m in milestones)


def lr_at(epoch: int, *, base: float, epochs: int, ref: int, schedule: str = "step", milestones: Sequence[int] = (),
          decay: float = 0.1, warmup: int = 0) -> float:
    """The LR of 1-indexed ``epoch`` of an ``epochs``-long run; the engine's only LR rule.

    ``milestones`` and ``warmup`` are written for a ``ref``-epoch run and scaled (``w = round(warmup * epochs / ref)``).
    Warm-up: ``e <= w`` -> ``base * e / w`` (epoch 1 of 5 trains at base/5, epoch 5 at base: no epoch at LR 0).
    Then ``step`` -> ``step_lr`` over the scaled milestones; ``cosine`` -> ``base * (1 + cos(pi * (e - w - 1) /
    (epochs - w))) / 2``: the first epoch after warm-up at ``base``, reaching 0 one epoch after the last
    (the PyTorch/timm per-epoch convention, so no epoch is wasted at LR 0).
    """
    w = scale_boundaries([warmup], epochs, ref)[0]
    if epoch <= w:
        return base * epoch / w
    if schedule == "step":
        return step_lr(base, epoch, scale_boundaries(list(milestones), epochs, ref), decay)
    if schedule == "cosine":
        return base * (1 + math.cos(math.pi * (epoch - w - 1) / (epochs - w))) / 2
    raise ValueError(f"unknown LR schedule {schedule!r}; use 'step' or 'cosine'")


# IPS section 4.5.4: p_r = 0.1, 0.2, 0.3, 0.5 after epochs 30, 80, 120 of 240.
INCREMENTAL_PR_BOUNDARIES = [30, 80, 120]
INCREMENTAL_PR_VALUES = [0.1, 0.2, 0.3, 0.5]


def swap_probability(kind: str, epoch: int, epochs: int, p: float, ref: int = 240) -> float:
    """p_r at a 1-indexed epoch: ``constant`` -> p; ``incremental`` -> the paper's steps, scaled to ``epochs``."""
    if kind == "constant":
        return p
    if kind == "incremental":
        bounds = scale_boundaries(INCREMENTAL_PR_BOUNDARIES, epochs, ref)
        return INCREMENTAL_PR_VALUES[sum(epoch > b for b in bounds)]
    raise ValueError(f"unknown p_r schedule {kind!r}; use 'constant' or 'incremental'")
