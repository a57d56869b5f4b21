"""CS-KD: Class-wise Self-Knowledge Distillation (Yun et al., CVPR 2020; `alinlab/cs-kd`).

Each anchor is paired with another training image of its class. The anchors are forwarded with
gradient; the partners are forwarded in train mode (so BatchNorm running statistics are updated
by both halves, as in the official ``train.py``) but under ``torch.no_grad``, and their softened
prediction is the fixed target of the anchor's prediction:

    L = CE(z, y) + lambda_cls * T^2 * KL_bm(softmax(sg[z'] / T) || softmax(z / T))

CE is on the anchor half only. Defaults are the official CIFAR-100 README command (T=4,
lambda_cls=1). The official fine-grained command (CUB-200-2011; assumed also for Stanford Dogs)
uses ``lambda_cls=3`` with batch size 32: per dataset, not per model, so it is not a model default;
pass ``method_args.lambda_cls=3 batch_size=32`` for those runs.

The official ``PairBatchSampler`` draws each partner uniformly from the anchor's class with the
anchor itself allowed, hence ``self_pairs=True`` by default; ``self_pairs=false`` excludes it.
The native CS-KD schedule and pre-activation ResNet are not used: every method shares one schedule and
one model zoo (RepDistiller's), since each baseline repository ships a different ResNet18.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ipsd.config import param
from ipsd.losses import ce, kl_t2
from ipsd.method import Batch, Method, Needs, Setup, Step, register_method


@dataclass
class CSKDConfig:
    T: float = param(4.0, lo=0, lo_open=True, doc="KD temperature (official CIFAR-100 command: 4)")
    lambda_cls: float = param(1.0, lo=0, doc="weight of the class-wise KL (CIFAR: 1; fine-grained CUB/Dogs: 3)")
    self_pairs: bool = param(True, doc="a partner may be the anchor itself (official sampler: yes)")


@register_method("cskd")
class CSKD(Method):
    Config = CSKDConfig
    cost_note = "the partner's forward runs without grad"

    @classmethod
    def needs_for(cls, cfg: CSKDConfig) -> Needs:
        return Needs(pairs=True, self_pairs=cfg.self_pairs)

    def forward(self, model: nn.Module, batch: Batch, step: Step) -> dict[str, Tensor]:
        c = self.cfg
        z = model(batch.x)  # anchors first, as the official code (order of BN running-stat updates)
        with torch.no_grad():  # train mode: the partner half still updates BN running statistics
            z_partner = model(batch.partner)
        return {"ce": ce(z, batch.y), "kd": c.lambda_cls * kl_t2(z_partner, z, c.T)}
