"""Epoch-wise schedules (1-indexed epochs, as in RepDistiller's loop).

Shorter runs keep the paper's shape: every boundary written for a ``ref``-epoch run (240 on CIFAR)
is scaled to ``round(b * epochs / ref)``.
"""
from __future__ import annotations


def scale_boundaries(boundaries: list[int], epochs: int, ref: int) -> list[int]:
    return [round(b * epochs / ref) for b in boundaries]


def step_lr(base: float, epoch: int, milestones: list[int], decay: float) -> float:
    """LR for 1-indexed ``epoch``: ``base * decay ** #{m : epoch > m}`` (150/180/210 -> 0.05, 5e-3, ...)."""
    return base * decay ** sum(epoch > m for m in milestones)


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
