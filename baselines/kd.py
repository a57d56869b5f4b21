"""KD: Hinton et al. 2015 logit distillation from a frozen teacher, spec teacher_kd a.1 (RepDistiller recipe).

    L = gamma * CE(z_s, y) + alpha * T^2 * KL_bm(softmax(z_t / T) || softmax(z_s / T))

KL summed over classes, averaged over the batch (``batchmean``). Defaults gamma 0.1, alpha 0.9, T 4
(RepDistiller ``-r 0.1 -a 0.9 -b 0 --kd_T 4``; mdistiller the same). The teacher sees the identical
augmented batch, runs in eval mode under no_grad and is a plain attribute (never a submodule), so it is
never optimised, checkpointed or touched by DDP.

Per-step cost: one teacher forward plus the student's forward and backward; the loss itself is O(B*C),
negligible.

This file also holds the pieces every teacher-based baseline here (kd, at, sp, rkd) shares:
:func:`require_teacher`, :func:`ce_kd_terms`, :func:`fp32` and :func:`gather_rows`. They are candidates
for a shared module (ipsd/losses.py or ipsd/teacher.py).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ipsd.config import ConfigError, param
from ipsd.dist import all_gather_cat
from ipsd.losses import ce, kl_t2
from ipsd.method import Method, Setup, register_method

# ------------------------------------------------------------------ shared by the teacher-based baselines

def require_teacher(setup: Setup, method: str) -> Any:
    """The run's FrozenTeacher; refuse to build without one (the engine passes it as ``setup.teacher``)."""
    if setup.teacher is None:
        raise ConfigError(f"method {method!r} needs a teacher: pass teacher=<name in results/teachers.yaml | "
                          f"run folder of a finished `ipsd train method=hard ...` | its checkpoint.pt>")
    return setup.teacher


def ce_kd_terms(cfg: Any, z_s: Tensor, z_t: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Spec a.0's gamma * CE + alpha * L_KD; ``kd`` is only returned when ``cfg.alpha > 0``
    (RepDistiller computes it at alpha 0 too, which changes nothing but the log)."""
    terms = {"ce": cfg.gamma * ce(z_s, y)}
    if cfg.alpha > 0:
        terms["kd"] = cfg.alpha * kl_t2(z_t, z_s, cfg.T)
    return terms


@contextlib.contextmanager
def fp32(t: Tensor) -> Iterator[None]:
    """Autocast off for the loss block: Gram matrices, distances and norms stay in fp32 under bf16 runs."""
    with torch.autocast(t.device.type, enabled=False):
        yield


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows concatenated along dim 0 (identity without a process group).

    Rows that need a gradient go through the autograd-aware all-gather, whose backward sums the gradients
    all ranks computed for this rank's rows. Every rank evaluates the same global loss, so that sum is
    world * dL/d(own rows); DDP's gradient averaging then yields exactly the single-process gradient of
    the relational loss over the global batch (spec (f) 8). Shard sizes are equal (the loader's contract).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    if t.requires_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(t.contiguous()))
    return all_gather_cat(t)


# ------------------------------------------------------------------------------------------------ KD

@dataclass
class KDConfig:
    gamma: float = param(0.1, lo=0, doc="CE weight (RepDistiller -r 0.1)")
    alpha: float = param(0.9, lo=0, doc="KD weight (RepDistiller -a 0.9)")
    T: float = param(4.0, lo=0, lo_open=True, doc="temperature on both sides (RepDistiller --kd_T 4)")


@register_method("kd")
class KD(Method):
    Config = KDConfig
    needs_teacher = True

    def __init__(self, cfg: KDConfig, setup: Setup):
        super().__init__(cfg, setup)
        self.teacher = require_teacher(setup, "kd")  # plain attribute: not a submodule (see FrozenTeacher)

    def forward(self, model, batch, step):
        z_s = model(batch.x)
        z_t = self.teacher(batch.x)
        return ce_kd_terms(self.cfg, z_s, z_t, batch.y)
