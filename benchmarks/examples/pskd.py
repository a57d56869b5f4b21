"""PS-KD: Progressive Self-Knowledge Distillation (Kim et al., ICCV 2021), written as a user's plugin.

This file is not part of ``baselines/``: a run imports it through the ``plugins`` config key
(``plugins=[benchmarks/examples/pskd.py]``), and the run's identity records its name and the sha256 of this
source. The target of each sample mixes its label with the model's own prediction for it from the previous
epoch: (1 - a_t) onehot(y) + a_t p_{t-1}(x), with a_t = alpha_T (t - 1) / T at 1-indexed epoch t of T, so the
first epoch trains on the labels alone. p_{t-1}(x) is the detached softmax from the sample's last visit, kept per
dataset index (``batch.index``) in a buffer that is checkpointed with the run; under DDP the ranks all-gather
(index, prediction) so every rank's buffer holds every sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ipsd import dist
from ipsd.config import param
from ipsd.losses import soft_ce
from ipsd.method import Method, register_method


@dataclass
class PSKDConfig:
    alpha_T: float = param(0.8, lo=0, hi=1, doc="weight of the previous prediction at the last epoch (paper: 0.8)")


@register_method("pskd")
class PSKD(Method):
    Config = PSKDConfig

    def __init__(self, cfg: PSKDConfig, setup):
        super().__init__(cfg, setup)
        self.register_buffer("previous", torch.zeros(setup.train_size, setup.num_classes))

    def forward(self, model, batch, step):
        z = model(batch.x)
        a = self.cfg.alpha_T * (step.epoch - 1) / step.epochs
        target = (1 - a) * F.one_hot(batch.y, z.shape[1]).float() + a * self.previous[batch.index]
        self.previous[dist.all_gather_cat(batch.index)] = dist.all_gather_cat(F.softmax(z.detach().float(), dim=1))
        return {"ce": soft_ce(target, z)}
