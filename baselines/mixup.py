"""MixUp (Zhang et al., ICLR 2018) as a plain cross-entropy augmentation baseline (IPS paper, Tables 10-13).

Every batch: one lambda ~ Beta(alpha, alpha) and one in-batch permutation, x~ = lambda x + (1 - lambda) x[perm],
loss = lambda CE(f(x~), y) + (1 - lambda) CE(f(x~), y[perm]). The default alpha = 1 is MixUp's CIFAR-10/100 setting
(official code facebookresearch/mixup-cifar10). The operator is ``ipsd.mixing.draw_mixup``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ipsd.config import param
from ipsd.method import Method, register_method
from ipsd.mixing import MIXUP_ALPHA, draw_mixup


@dataclass
class MixupConfig:
    alpha: float = param(MIXUP_ALPHA, lo=0, lo_open=True, doc="lambda ~ Beta(alpha, alpha) (MixUp on CIFAR: 1)")


@register_method("mixup")
class Mixup(Method):
    Config = MixupConfig

    def forward(self, model, batch, step):
        mix = draw_mixup(batch.x.shape, step.generator, self.cfg.alpha)
        return {"ce": mix.ce(model(mix.apply(batch.x)), batch.y)}
