"""Cutout (DeVries & Taylor, arXiv 1708.04552) as a plain cross-entropy augmentation baseline (IPS paper, Tables
10-13).

Every image loses one ``size`` x ``size`` square (set to 0 after normalisation, the mean pixel, as the official
transform does), its centre uniform over the image and the square clipped at the border; loss = CE(f(x'), y). The
default, 8 px, is Cutout's CIFAR-100 setting (official code uoguelph-mlrg/Cutout: ``--length 8``; on CIFAR-10 it
is 16 px: pass ``method_args.size=16``, as the tables' CIFAR-10 profiles do). The operator is
``ipsd.mixing.draw_cutout``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ipsd.config import param
from ipsd.method import Method, register_method
from ipsd.mixing import CUTOUT_SIZE_CIFAR100, draw_cutout


@dataclass
class CutoutConfig:
    size: int = param(CUTOUT_SIZE_CIFAR100, lo=1, doc="side of the square hole in px (Cutout: 8 on CIFAR-100, "
                                                       "16 on CIFAR-10)")


@register_method("cutout")
class Cutout(Method):
    Config = CutoutConfig

    def forward(self, model, batch, step):
        mix = draw_cutout(batch.x.shape, step.generator, self.cfg.size)
        return {"ce": mix.ce(model(mix.apply(batch.x)), batch.y)}
