"""CutMix (Yun et al., ICCV 2019) as a plain cross-entropy augmentation baseline (IPS paper, Tables 10-13).

With probability ``prob`` a batch is mixed: one lambda ~ Beta(alpha, alpha) and one box for the whole batch, each
image takes the box from its in-batch partner x[perm], and the loss is lam CE(z, y) + (1 - lam) CE(z, y[perm]) with
lam = 1 - box area / image area; otherwise plain CE. Defaults are CutMix's CIFAR-100 setting (official code
clovaai/CutMix-PyTorch: ``--beta 1.0 --cutmix_prob 0.5``). The operator is ``ipsd.mixing.draw_cutmix``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ipsd.config import param
from ipsd.method import Method, register_method
from ipsd.mixing import CUTMIX_ALPHA, CUTMIX_PROB, draw_cutmix


@dataclass
class CutMixConfig:
    alpha: float = param(CUTMIX_ALPHA, lo=0, lo_open=True, doc="lambda ~ Beta(alpha, alpha) (CutMix on CIFAR: 1)")
    prob: float = param(CUTMIX_PROB, lo=0, hi=1, doc="probability that a batch is mixed (CutMix on CIFAR-100: 0.5)")


@register_method("cutmix")
class CutMix(Method):
    Config = CutMixConfig

    def forward(self, model, batch, step):
        mix = draw_cutmix(batch.x.shape, step.generator, self.cfg.alpha, self.cfg.prob)
        return {"ce": mix.ce(model(mix.apply(batch.x)), batch.y)}
