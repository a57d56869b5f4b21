"""BYOT: Be Your Own Teacher (Zhang et al., ICCV 2019), spec selfdistill b.9.

Auxiliary classifiers are attached after every ResNet stage but the last (stages 1-3 of the
4-stage ResNets, CIFAR-input or torchvision ImageNet ones; stages 1-2 of the 3-stage CIFAR
ResNets). The network's own classifier on the deepest stage is the teacher. The heads belong to
the method (``nn.Module`` children: trained, weight-decayed, DDP-synchronised and checkpointed with
it) and are never used at evaluation, which calls the model alone.

Head architecture (``head``):
  * ``sepconv`` (official "final" code, ``pytorch-self-distillation-final/resnet.py``): one
    depthwise-separable block per remaining stage, each stride 2 and widening to the next stage's
    channels (dw3x3/s2, pw1x1, BN, ReLU, dw3x3, pw1x1, BN, ReLU), so the branch reaches the deepest
    stage's channels and resolution; then global average pool and a linear layer. With
    ``attention`` (also in the official code) the stage map is first gated by
    ``sigmoid(upsample(SepConv(x)))``.
  * ``bottleneck`` (luanyunteng re-implementation): 1x1 conv to C_last/4, k x k conv with stride
    k = the spatial ratio to the deepest stage, 1x1 conv to C_last, each + BN + ReLU (convs with bias).
  ``auto`` picks sepconv(+attention) for ``form=final`` and bottleneck (no attention) for ``form=paper``.
  Convs are He-normal (fan_out), BN weight 1 / bias 0, linear layers PyTorch default, as in both codes.

Loss (``form``):
  * ``final`` (default, official code): CE(z_deep) + sum_aux [(1-a) CE(z_aux)
    + a H(softmax(sg[z_deep]/T), softmax(z_aux/T))], T = 3, a = 0.3, no T^2, no feature loss.
  * ``paper`` (luanyunteng): (1-a) [CE(z_deep) + sum_aux CE(z_aux)] + a T^2 sum_aux H(...)
    + beta sum_aux sum[(h_aux - sg[h_deep])^2 * 1(h_aux > 0 or h_deep > 0)], T = 3, a = 0.1, beta = 1e-6.
    The feature term is a sum over batch and elements (not a mean). Its features (``feature``):
    ``pooled`` (default) = the globally pooled vectors, which is what the re-implementation actually
    compares (its beta was chosen for that scale); ``map`` = the pre-pool maps of head and trunk
    (same shape by construction), the paper's "feature maps" reading.
    Under DDP the per-rank sum is multiplied by the world size, so the averaged gradient equals
    the single-process one for the same global batch (the other terms are batch means already).

The official code's extra AutoAugment + Cutout and its own LR schedule are not used (spec b.9).
BYOT is defined for ResNets only (the paper's CIFAR and ImageNet networks); other families are refused.
The ImageNet ResNets (family ``imagenet_resnet``) halve the resolution at every stage after the
first, like the CIFAR ones, so the same stride-2 branches reach the deepest stage's shape.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn

from ipsd.config import ConfigError, param
from ipsd.losses import ce, soft_ce
from ipsd.method import Method, Setup, register_method
from ipsd.models.base import he_init

RESNET_FAMILIES = ("resnet", "cifar_resnet", "imagenet_resnet")
FORM_DEFAULTS = {"final": {"alpha": 0.3, "head": "sepconv", "attention": True},
                 "paper": {"alpha": 0.1, "head": "bottleneck", "attention": False}}


@dataclass
class BYOTConfig:
    form: str = param("final", choices=("final", "paper"),
                      doc="final = official journal code (CE + soft CE, no T^2/feature loss); "
                          "paper = luanyunteng re-implementation (T^2, feature loss)")
    T: float = param(3.0, lo=0, lo_open=True, doc="distillation temperature")
    alpha: float | None = param(None, lo=0, hi=1, doc="KD weight; null = 0.3 (final) / 0.1 (paper)")
    beta: float = param(1e-6, lo=0, doc="feature-loss weight (form=paper only)")
    feature: str = param("pooled", choices=("pooled", "map"),
                         doc="features of the paper-form hint loss: pooled vectors (re-implementation) or pre-pool maps")
    head: str = param("auto", choices=("auto", "sepconv", "bottleneck"),
                      doc="auxiliary branch: auto = sepconv (final) / bottleneck (paper)")
    attention: bool | None = param(None, doc="official attention gate before each sepconv branch; null = on for final")


def _check_family(model: str, family: str) -> None:
    if family not in RESNET_FAMILIES:
        raise ConfigError(f"method=byot supports ResNets only (model families {', '.join(RESNET_FAMILIES)}); "
                          f"model={model} is a {family or 'unknown'} model. Pick e.g. model=resnet18.")


def sep_conv(cin: int, cout: int, stride: int) -> nn.Sequential:
    """Depthwise-separable block of the official BYOT code (two dw+pw convs, each followed by BN + ReLU)."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.Conv2d(cin, cin, 1, bias=False),
        nn.BatchNorm2d(cin), nn.ReLU(),
        nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False), nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout), nn.ReLU(),
    )


def bottleneck_branch(cin: int, cout: int, stride: int) -> nn.Sequential:
    """The re-implementation's branch: 1x1 reduce to cout/4, stride-k k x k conv, 1x1 expand, each + BN + ReLU."""
    mid = max(cout // 4, 1)
    return nn.Sequential(
        nn.Conv2d(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, mid, stride, stride), nn.BatchNorm2d(mid), nn.ReLU(),
        nn.Conv2d(mid, cout, 1), nn.BatchNorm2d(cout), nn.ReLU(),
    )


class AuxHead(nn.Module):
    """Classifier on stage ``s``: (attention gate) -> branch to the deepest stage's shape -> pool -> linear."""

    def __init__(self, channels: tuple[int, ...], s: int, num_classes: int, kind: str, attention: bool):
        super().__init__()
        self.gate = sep_conv(channels[s], channels[s], 2) if attention else None
        if kind == "sepconv":
            self.branch = nn.Sequential(*[sep_conv(channels[i], channels[i + 1], 2) for i in range(s, len(channels) - 1)])
        else:
            self.branch = bottleneck_branch(channels[s], channels[-1], 2 ** (len(channels) - 1 - s))
        self.fc = nn.Linear(channels[-1], num_classes)
        he_init(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(logits, pre-pool map, pooled vector)."""
        if self.gate is not None:
            att = F.interpolate(self.gate(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = x * torch.sigmoid(att)
        fmap = self.branch(x)
        pooled = F.adaptive_avg_pool2d(fmap, 1).flatten(1)
        return self.fc(pooled), fmap, pooled


def hint_loss(h_aux: Tensor, h_deep: Tensor) -> Tensor:
    """Summed squared error where either feature is positive (deep side detached)."""
    h_aux, h_deep = h_aux.float(), h_deep.detach().float()
    mask = ((h_aux > 0) | (h_deep > 0)).float()
    return ((h_aux - h_deep) ** 2 * mask).sum()


def _world() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


@register_method("byot")
class BYOT(Method):
    Config = BYOTConfig

    @classmethod
    def resolve_config(cls, model: str, args: dict[str, Any], where: str = "method_args.") -> BYOTConfig:
        """Refuse non-ResNets early and fill the form-dependent defaults (alpha, head, attention)."""
        from ipsd.models import MODELS

        try:
            spec = MODELS.get(model)
        except KeyError:
            spec = None
        if spec is not None:
            _check_family(spec.name, spec.family)
        cfg = super().resolve_config(model, args, where)
        fill = {k: v for k, v in FORM_DEFAULTS[cfg.form].items()
                if getattr(cfg, k) is None or (k == "head" and cfg.head == "auto")}
        return dataclasses.replace(cfg, **fill)

    def __init__(self, cfg: BYOTConfig, setup: Setup):
        super().__init__(cfg, setup)
        _check_family(setup.model, setup.family)
        channels = tuple(setup.stage_channels)
        if len(channels) < 2:
            raise ConfigError(f"method=byot needs a model with at least 2 stages; {setup.model} has {len(channels)}")
        defaults = FORM_DEFAULTS[cfg.form]
        self.alpha = defaults["alpha"] if cfg.alpha is None else cfg.alpha
        kind = defaults["head"] if cfg.head == "auto" else cfg.head
        attention = defaults["attention"] if cfg.attention is None else cfg.attention
        self.heads = nn.ModuleList(AuxHead(channels, s, setup.num_classes, kind, attention)
                                   for s in range(len(channels) - 1))

    def ddp_ignored(self) -> list[str]:
        """No per-rank state: the heads' BN buffers are broadcast by DDP like the model's."""
        return []

    def forward(self, model, batch, step) -> dict[str, Tensor]:
        c, a = self.cfg, self.alpha
        z_deep, feats = model(batch.x, features=True)
        outs = [head(feats.stages[s]) for s, head in enumerate(self.heads)]
        teacher = F.softmax(z_deep.detach().float() / c.T, dim=1)
        kd = sum(soft_ce(teacher, z, c.T) for z, _, _ in outs)
        ce_aux = sum(ce(z, batch.y) for z, _, _ in outs)
        if c.form == "final":
            return {"ce": ce(z_deep, batch.y) + (1 - a) * ce_aux, "kd": a * kd}
        deep = feats.pooled if c.feature == "pooled" else feats.pre_pool
        hints = []
        for _, fmap, pooled in outs:
            h = pooled if c.feature == "pooled" else fmap
            if h.shape != deep.shape:
                raise RuntimeError(f"BYOT head features {tuple(h.shape)} do not match the deepest {tuple(deep.shape)}")
            hints.append(hint_loss(h, deep))
        return {"ce": (1 - a) * (ce(z_deep, batch.y) + ce_aux), "kd": a * c.T * c.T * kd,
                "feat": c.beta * _world() * sum(hints)}
