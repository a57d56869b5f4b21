"""IPS combined with CutMix, Cutout or MixUp (IPS paper, Table 13: ResNet50, p_r in {0, 0.1, 0.3, 0.5, 0.8, 1}).

The paper does not say in which order mixing and the swap happen, whether the two views share the mixing partner
and lambda, or how mixed labels enter the loss. Choices (each alternative is an option):

* order (``mix_order``): ``after_swap`` (default) swaps the same-class pair first (IPS's ``patch_swap``, p_r
  schedule and draws), then mixes each swapped view; ``before_swap`` mixes the anchors and the partners first (one
  shared draw), then swaps.
* sharing (``mix_partner``): ``shared`` (default) gives both views one draw: the same in-batch permutation and lambda
  (and, for CutMix, the same box; for Cutout, the same hole in each pair), so both views carry the same label pair
  (y, y[perm]) and the KD term compares views of one mixed target; ``independent`` draws once per view (after the
  swap only).
* labels: each view's CE is lam CE(z, y) + (1 - lam) CE(z, y[perm]) (= CE against the mixed one-hot target; Cutout
  keeps y), weighted 0.5 * gamma as in IPS; the KD term between the two views is IPS's, unchanged
  (``IPS.distill``).

Mixing settings are the plain baselines' defaults (``ipsd.mixing``: CutMix alpha 1, probability 0.5; Cutout 8 px,
the CIFAR-100 setting; MixUp alpha 1); IPS's settings and per-model weights (gamma = alpha = 0.5 for ResNet50) are
IPS's. Table 13 uses the constant p_r schedule at each p_r.
"""
from __future__ import annotations

from dataclasses import dataclass

from baselines.ips import IPS, IPSConfig
from ipsd.config import ConfigError, param
from ipsd.method import forward_views, register_method
from ipsd.mixing import CUTMIX_ALPHA, CUTMIX_PROB, CUTOUT_SIZE_CIFAR100, KINDS, draw
from ipsd.patch_swap import patch_swap


@dataclass
class IPSMixConfig(IPSConfig):
    mix: str = param("cutmix", choices=KINDS, doc="the augmentation combined with IPS")
    mix_alpha: float = param(CUTMIX_ALPHA, lo=0, lo_open=True,
                             doc="lambda ~ Beta(mix_alpha, mix_alpha) of cutmix and mixup (both papers on CIFAR: 1)")
    cutmix_prob: float = param(CUTMIX_PROB, lo=0, hi=1, doc="probability that a batch is CutMix-ed (CIFAR-100: 0.5)")
    cutout_size: int = param(CUTOUT_SIZE_CIFAR100, lo=1, doc="Cutout hole side in px (CIFAR-100: 8, CIFAR-10: 16)")
    mix_order: str = param("after_swap", choices=("after_swap", "before_swap"),
                           doc="mix each swapped view (after_swap) or the anchors and partners before the swap")
    mix_partner: str = param("shared", choices=("shared", "independent"),
                             doc="one draw (permutation, lambda, box or holes) for both views, or one per view")

    def __post_init__(self) -> None:
        if self.mix_order == "before_swap" and self.mix_partner != "shared":
            raise ConfigError("method_args.mix_partner=independent needs mix_order=after_swap: before the swap one "
                              "draw mixes the anchors and the partners alike")


@register_method("ips_mix")
class IPSMix(IPS):
    Config = IPSMixConfig

    def _draw(self, x, step):
        c = self.cfg
        return draw(c.mix, x.shape, step.generator, alpha=c.mix_alpha, prob=c.cutmix_prob, size=c.cutout_size)

    def forward(self, model, batch, step):
        c = self.cfg
        p = self.swap_probability(step)
        if c.mix_order == "before_swap":
            ma = mb = self._draw(batch.x, step)
            xa, xb = patch_swap(ma.apply(batch.x), ma.apply(batch.partner), c.grid, p, step.generator, c.k_mode)
        else:
            xa, xb = patch_swap(batch.x, batch.partner, c.grid, p, step.generator, c.k_mode)
            ma = self._draw(xa, step)
            mb = ma if c.mix_partner == "shared" else self._draw(xb, step)
            xa, xb = ma.apply(xa), mb.apply(xb)
        za, zb = forward_views(model, xa, xb, joint=c.forward == "joint")
        return {"ce": 0.5 * c.gamma * (ma.ce(za, batch.y) + mb.ce(zb, batch.y)), "kd": self.distill(za, zb)}
