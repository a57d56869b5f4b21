"""TF-KD_reg, the teacher-free "virtual teacher" of Yuan et al. (CVPR 2020), the TF-KD variant IPS compares
against ("a manually designed virtual teacher with 100% accuracy").

Default ``form=code`` reproduces the official code (``loss_kd_regularization``), which differs from the
paper's equation: the virtual teacher is q = 0.99 on the label and 0.01/(C-1) elsewhere, and its
distribution is u = softmax(q / T), the softmax *of a probability vector* (nearly uniform: u_y = 0.01050
at T=20, C=100); the student is not temperature-scaled (author, issue #3); the KL uses PyTorch's legacy
elementwise mean (divides by B*C) times a per-model multiplier m:

    L = (1-a) CE(z, y) + a * m * mean_{i,k} u log(u / softmax(z))  =  (1-a) CE + a (m/C) KL_bm(u || softmax(z))

``form=paper`` is the paper's equation instead: (1-a) CE + a T^2 KL_bm(p^d_T || softmax(z/T)), where the
0.99-peaked teacher p^d is softened at temperature T as a distribution, p^d_T = softmax(log(p^d) / T)
(i.e. p^d^(1/T), renormalised), and there is no multiplier (m is ignored).

Per-model settings: the official ``params.json`` give ResNet18 T=20, a=0.1, m=100 and ShuffleNetV2 T=10,
a=0.95, m=1. Not given for the other zoo models; assumed: the ResNet18 setting
for ResNet34/50/101, VGG13/16 and the small CIFAR ResNets, the ShuffleNetV2 setting for ShuffleNetV1.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ipsd.config import ConfigError, param
from ipsd.losses import ce, kl_t2
from ipsd.method import Method, Setup, register_method

SHUFFLE = {"T": 10.0, "alpha": 0.95, "multiplier": 1.0}


@dataclass
class TFKDRegConfig:
    T: float = param(20.0, lo=0, lo_open=True,
                     doc="virtual-teacher temperature (ResNet18 20; ShuffleNetV2 10; others assumed, see module doc)")
    alpha: float = param(0.1, lo=0, hi=1, doc="weight of the regulariser; CE gets 1-alpha (ResNet18 0.1, ShuffleNetV2 0.95)")
    multiplier: float = param(100.0, lo=0, doc="m, scales the elementwise-mean KL of form=code (ResNet18 100, "
                                               "ShuffleNetV2 1); unused by form=paper")
    correct_prob: float = param(0.99, lo=0, hi=1, lo_open=True, doc="virtual teacher's probability of the true class")
    form: str = param("code", choices=("code", "paper"),
                      doc="code: official loss_kd_regularization (softmax(q/T) target, student at T=1, (m/C) KL_bm); "
                          "paper: T^2 KL_bm(softmax(log q / T) || softmax(z/T)), no multiplier")


def virtual_teacher(y: Tensor, num_classes: int, correct_prob: float) -> Tensor:
    """q: (B, C) fp32, correct_prob on the label and (1-correct_prob)/(C-1) on every other class."""
    q = torch.full((len(y), num_classes), (1.0 - correct_prob) / (num_classes - 1), device=y.device,
                   dtype=torch.float32)
    return q.scatter_(1, y[:, None], correct_prob)


def teacher_distribution(y: Tensor, num_classes: int, correct_prob: float, T: float, form: str = "code") -> Tensor:
    """The target distribution of the KL: softmax(q/T) (code) or softmax(log(q)/T) (paper)."""
    q = virtual_teacher(y, num_classes, correct_prob)
    return torch.softmax((q if form == "code" else q.log()) / T, dim=1)


@register_method("tfkd_reg")
class TFKDReg(Method):
    Config = TFKDRegConfig
    model_defaults: ClassVar[dict[str, dict[str, Any]]] = {"shufflenetv2": dict(SHUFFLE), "shufflenetv1": dict(SHUFFLE)}

    def __init__(self, cfg: TFKDRegConfig, setup: Setup):
        super().__init__(cfg, setup)
        if setup.num_classes < 2:
            raise ConfigError("tfkd_reg needs at least 2 classes")
        if cfg.form == "paper" and cfg.correct_prob == 1.0:
            raise ConfigError("method_args.correct_prob=1 makes log(q) infinite in form='paper'; use a value < 1")

    def forward(self, model, batch, step):
        c = self.cfg
        z = model(batch.x)
        q = virtual_teacher(batch.y, z.shape[1], c.correct_prob)
        if c.form == "code":
            # KL(softmax(q/T) || softmax(z)): kl_t2 at temperature 1 with target logits q/T
            kd = c.alpha * (c.multiplier / z.shape[1]) * kl_t2(q / c.T, z, 1.0)
        else:
            kd = c.alpha * kl_t2(q.log(), z, c.T)
        return {"ce": (1.0 - c.alpha) * ce(z, batch.y), "kd": kd}
