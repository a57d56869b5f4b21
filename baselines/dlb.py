"""DLB: Self-Distillation from the Last Mini-Batch (Shen et al., CVPR 2022; `Meta-knowledge-Lab/DLB`).

Default ``form="code"`` reproduces the official ``dlb.py``. Every image has two independent views
(``batch.x`` = view 0, ``batch.view2`` = view 1). At step t, with the current batch D_t and the
previous one D_{t-1} (its view-1 images, labels, and the detached view-0 logits z_{t-1} computed at
step t-1 with the parameters of that step):

    z_t  = model(view0(D_t))                 # first call
    z~   = model(view1(D_{t-1}))             # second call: separate BatchNorm statistics
    L_t  = CE([z~; z_t], [y_{t-1}; y_t])     # mean over all images of both batches
         + alpha * T^2 * KL_bm(softmax(sg[z_{t-1}]/T) || softmax(z~/T))

The very first step of training has no previous batch: CE on z_t only (``kd`` is logged as 0).
The state (previous images, labels, logits) is carried across steps and epoch boundaries, as the
official code returns it from ``train_one_epoch``, and it is checkpointed (``get_extra_state``),
so a resumed run continues exactly like an uninterrupted one. Consecutive batches may differ in
size (the last batch of an epoch is smaller); nothing assumes equal sizes.

``form="paper"``: the paper's wording, "half of each mini-batch coincides with the previous
iteration, the other half with the upcoming one; the former half distils the soft targets generated
for it in the previous iteration". With the engine's loader, each step brings B fresh images, so
the paper's mini-batch at step t is [carried half ; fresh half] = [view1(D_{t-1}) ; view0(D_t)]
(2B images, exactly half overlapping), forwarded in ONE call (one mini-batch, shared BatchNorm
statistics); the carried half distils the detached logits it got as the fresh half at step t-1.
The carried images are a new augmentation (view 1), as re-loading an index through a data
loader re-applies the random transform. Loss and state are as in the code form. So the paper's
mini-batch size n corresponds to ``batch_size = n / 2`` here (the paper's CIFAR n=64 -> 32); with
the same ``batch_size`` both forms see the same images per step and differ only in BatchNorm.

Under DDP each rank carries its own previous batch (``per_rank_state``: the engine's checkpoint keeps
every rank's copy and each rank takes back its own on resume).

Not settled by the official code / assumptions:
* T=3, alpha=1 from the paper (``dlb.py`` has no defaults).
* The official optimiser uses Nesterov momentum; the engine's optimiser is shared, so pass the
  run-level ``nesterov=true`` to match it (not forced here).
* Stored logits are kept in fp32 (under bf16 autocast the model's logits are bf16).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ipsd.config import param
from ipsd.losses import ce, kl_t2
from ipsd.method import (
    Batch,
    Method,
    Needs,
    Setup,
    Step,
    forward_views,
    register_method,
)


@dataclass
class DLBConfig:
    T: float = param(3.0, lo=0, lo_open=True, doc="KD temperature (paper: 3; dlb.py has no default)")
    alpha: float = param(1.0, lo=0, doc="weight of the last-mini-batch KL (paper: 1)")
    form: str = param("code", choices=("code", "paper"),
                      doc="code: official dlb.py, two model calls; paper: one call over [carried half; fresh half]")


@dataclass
class LastBatch:
    """What step t leaves for step t+1: the images to re-feed, their labels and their soft-target logits."""

    x: Tensor  # (B, C, H, W) view-1 images of the batch
    y: Tensor  # (B,) labels
    z: Tensor  # (B, K) detached fp32 logits of the batch's view 0, from the step that saw it fresh

    def as_dict(self) -> dict[str, Tensor]:
        return {"x": self.x, "y": self.y, "z": self.z}


def _like(x: Tensor, ref: Tensor) -> Tensor:
    """``x`` on ``ref``'s device and memory format (a restored image batch may be contiguous)."""
    x = x.to(ref.device)
    if ref.dim() == 4 and not ref.is_contiguous() and ref.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@register_method("dlb")
class DLB(Method):
    Config = DLBConfig
    per_rank_state = True

    @classmethod
    def needs_for(cls, cfg: DLBConfig) -> Needs:
        return Needs(views=2)

    @classmethod
    def train_views(cls, cfg: DLBConfig) -> int:
        return 1 if cfg.form == "code" else 0  # the paper form's first call leads with the previous batch

    def __init__(self, cfg: DLBConfig, setup: Setup):
        super().__init__(cfg, setup)
        self.last: LastBatch | None = None  # this rank's previous batch

    def forward(self, model: nn.Module, batch: Batch, step: Step) -> dict[str, Tensor]:
        c, last = self.cfg, self.last
        if last is None:
            z = model(batch.x)
            losses = {"ce": ce(z, batch.y), "kd": torch.zeros((), device=z.device)}
        else:
            x_old, y_old, t_old = _like(last.x, batch.x), last.y.to(batch.y.device), last.z.to(batch.x.device)
            if c.form == "code":
                z = model(batch.x)  # official order: the current batch first, then the previous one
                z_old = model(x_old)
            else:
                z_old, z = forward_views(model, x_old, batch.x, joint=True)
            losses = {"ce": ce(torch.cat([z_old, z]), torch.cat([y_old, batch.y])),
                      "kd": c.alpha * kl_t2(t_old, z_old, c.T)}
        # a copy, never a view of z: under CUDA graphs (compile_mode=reduce-overhead) z's memory is reused next step
        self.last = LastBatch(batch.view2, batch.y, z.detach().to(torch.float32, copy=True))
        return losses

    def get_extra_state(self) -> dict[str, Any]:
        """This rank's carried batch (empty before the first step)."""
        return self.last.as_dict() if self.last is not None else {}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.last = LastBatch(state["x"], state["y"], state["z"]) if state else None
