"""BYOT: Be Your Own Teacher (Zhang et al., ICCV 2019).

Auxiliary classifiers are attached after every ResNet stage but the last (stages 1-3 of the
4-stage ResNets, CIFAR-input or torchvision ImageNet ones; stages 1-2 of the 3-stage CIFAR
ResNets). The network's own classifier on the deepest stage is the teacher. The heads, and the
official form's adaptation layers, belong to the method (``nn.Module`` children: trained,
weight-decayed, DDP-synchronised and checkpointed with it) and are never used at evaluation,
which calls the model alone.

Forms (``form``), each named after the code it reproduces:
  * ``official`` (default): the authors' code as it stands, ArchipLab-LinfengZhang/
    pytorch-self-distillation-final at its 2020-07-07 "feature distillation" commits
    (``train.py`` training loop, ``resnet.py`` ``ResNet.__init__``/``forward``).
  * ``official_v1``: the same repository's first version (2020-06-09): ``official`` without the
    feature term (beta = 0, no adaptation layers) and without the BN + ReLU in the attention gate.
  * ``reimpl``: luanyunteng's re-implementation of the conference paper.
Every field left null (or ``head=auto``) takes its form's value from ``FORM_DEFAULTS``.

Head architecture (``head``):
  * ``sepconv`` (both official versions, ``resnet.py`` ``SepConv`` and ``scala1``-``scala3``): one
    depthwise-separable block per remaining stage, each stride 2 and widening to the next stage's
    channels (dw3x3/s2, pw1x1, BN, ReLU, dw3x3, pw1x1, BN, ReLU), so the branch reaches the deepest
    stage's channels and resolution; then global average pool and a linear layer (``fc1``-``fc3``).
    With ``attention`` (``attention1``-``attention3``) the stage map x is first multiplied by
    ``sigmoid(upsample2x(g(x)))``, g = a channel-preserving stride-2 SepConv; with ``attention_bn``
    (``official`` only) g is SepConv -> BatchNorm -> ReLU, so the gate lies in [0.5, 1).
  * ``bottleneck`` (re-implementation): 1x1 conv to C_last/4, k x k conv with stride
    k = the spatial ratio to the deepest stage, 1x1 conv to C_last, each + BN + ReLU (convs with bias).
  Convs are He-normal (fan_out), BN weight 1 / bias 0, linear layers PyTorch default, as in both codes.
  ResNet18 (CIFAR, 100 classes) heads on stages 1/2/3 hold 329,828 / 342,116 / 391,268 parameters
  (``official``; 128 / 256 / 512 fewer in ``official_v1``), as in the official ``resnet18``.

Loss, official forms (``train.py``): CE(z_deep) + sum_aux [(1-a) CE(z_aux)
  + a H(softmax(sg[z_deep]/T), softmax(z_aux/T))] + beta sum_{feature heads} ||A_i(h_i) - sg[h_deep]||_2,
  T = 3, a = 0.3, no T^2. The KD and CE terms and T, a are the same in both versions.
  * h_i is the head's pooled vector (the ``fc`` input), h_deep the model's pooled deepest feature
    (``out*_feature``); A_i = ``Linear(C_head, num_features)`` (512 -> 512 for ResNet18), the
    "adaptation layer", trained with the net (same SGD and weight decay), PyTorch-default init.
  * ||.||_2 is ``torch.dist``: the Euclidean norm of the whole (B, D) difference, i.e.
    sqrt(sum over batch and features of squared differences) -- not squared, not a batch mean.
    beta = 0.03 (``--feature_loss_coefficient``); one norm per feature head, summed.
  * Feature heads: every shallow head but the deepest one. The official loop skips ``index 1`` of its
    deepest-first output list, i.e. the stage-3 head, so stages 1 and 2 get the term (its comment says
    the shallowest head is skipped; the code is followed). It also builds an adaptation layer for the
    stage-3 head that no loss uses (never updated); that layer is not built here.
  * Under DDP the norm is taken over the all-gathered global batch (gradient to each rank's own rows),
    so torchrun computes the single-process loss.

Loss, ``reimpl``: (1-a) [CE(z_deep) + sum_aux CE(z_aux)] + a T^2 sum_aux H(...)
    + beta sum_aux sum[(h_aux - sg[h_deep])^2 * 1(h_aux > 0 or h_deep > 0)], T = 3, a = 0.1, beta = 1e-6.
    The feature term is a sum over batch and elements (not a mean). Its features (``feature``):
    ``pooled`` (default) = the globally pooled vectors, which is what the re-implementation actually
    compares (its beta was chosen for that scale); ``map`` = the pre-pool maps of head and trunk
    (same shape by construction), the paper's "feature maps" reading.
    Under DDP the per-rank sum is multiplied by the world size, so the averaged gradient equals
    the single-process one for the same global batch (the other terms are batch means already).

The official recipe's AutoAugment + Cutout and its schedule (250 epochs, batch 128, LR 0.1 divided by 10
at epochs E/3, 2E/3 and E-10) are not used: runs take the suite's common augmentation and schedule.
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
from ipsd.dist import gather_rows
from ipsd.losses import ce, fp32, soft_ce
from ipsd.method import Method, Setup, register_method
from ipsd.models.base import he_init

RESNET_FAMILIES = ("resnet", "cifar_resnet", "imagenet_resnet")
OFFICIAL_SHARED = {"alpha": 0.3, "head": "sepconv", "attention": True}
FORM_DEFAULTS = {"official": {**OFFICIAL_SHARED, "beta": 0.03, "attention_bn": True},
                 "official_v1": {**OFFICIAL_SHARED, "beta": 0.0, "attention_bn": False},
                 "reimpl": {"alpha": 0.1, "beta": 1e-6, "head": "bottleneck", "attention": False,
                            "attention_bn": False}}


@dataclass
class BYOTConfig:
    form: str = param("official", choices=tuple(FORM_DEFAULTS),
                      doc="official = authors' current code (+ adapted feature distance); official_v1 = its first "
                          "version (CE + soft CE only); reimpl = luanyunteng re-implementation (T^2, masked hint)")
    T: float = param(3.0, lo=0, lo_open=True, doc="distillation temperature")
    alpha: float | None = param(None, lo=0, hi=1, doc="KD weight; null = 0.3 (official forms) / 0.1 (reimpl)")
    beta: float | None = param(None, lo=0, doc="feature-term weight; null = 0.03 (official) / 0 (official_v1) / "
                                               "1e-6 (reimpl)")
    feature: str = param("pooled", choices=("pooled", "map"),
                         doc="features of the reimpl hint loss: pooled vectors (re-implementation) or pre-pool maps")
    head: str = param("auto", choices=("auto", "sepconv", "bottleneck"),
                      doc="auxiliary branch: auto = sepconv (official forms) / bottleneck (reimpl)")
    attention: bool | None = param(None, doc="official attention gate before each sepconv branch; null = on for "
                                             "the official forms")
    attention_bn: bool | None = param(None, doc="BatchNorm + ReLU after the gate's SepConv; null = on for official")


def _check_family(model: str, family: str) -> None:
    if family not in RESNET_FAMILIES:
        raise ConfigError(f"method=byot supports ResNets only (model families {', '.join(RESNET_FAMILIES)}); "
                          f"model={model} is a {family or 'unknown'} model. Pick e.g. model=resnet18.")


def _with_form_defaults(cfg: BYOTConfig) -> BYOTConfig:
    """``cfg`` with every null field (and ``head=auto``) set to its form's value."""
    fill = {k: v for k, v in FORM_DEFAULTS[cfg.form].items() if getattr(cfg, k) in (None, "auto")}
    return dataclasses.replace(cfg, **fill)


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


def attention_gate(c: int, bn: bool) -> nn.Sequential:
    """The gate's pre-sigmoid map: a stride-2 SepConv(c, c), then BN + ReLU when ``bn`` (official)."""
    gate = sep_conv(c, c, 2)
    return nn.Sequential(*gate, nn.BatchNorm2d(c), nn.ReLU()) if bn else gate


class AuxHead(nn.Module):
    """Classifier on stage ``s``: (attention gate) -> branch to the deepest stage's shape -> pool -> linear."""

    def __init__(self, channels: tuple[int, ...], s: int, num_classes: int, kind: str, attention: bool,
                 attention_bn: bool = False):
        super().__init__()
        self.gate = attention_gate(channels[s], attention_bn) if attention else None
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


def adapted_distance(adapt: nn.Linear, h: Tensor, h_deep: Tensor) -> Tensor:
    """||adapt(h) - sg[h_deep]||_2 over the whole global batch (``torch.dist``: sqrt of the summed squares), fp32."""
    with fp32(h):
        diff = adapt(h.float()) - h_deep.detach().float()
        return torch.linalg.vector_norm(gather_rows(diff))


def _world() -> int:
    return tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1


@register_method("byot")
class BYOT(Method):
    Config = BYOTConfig
    cost_note = "auxiliary heads on every stage but the last"

    @classmethod
    def resolve_config(cls, model: str, args: dict[str, Any], where: str = "method_args.") -> BYOTConfig:
        """Refuse non-ResNets early and fill the form-dependent defaults (alpha, beta, head, attention)."""
        from ipsd.models import MODELS

        try:
            spec = MODELS.get(model)
        except KeyError:
            spec = None
        if spec is not None:
            _check_family(spec.name, spec.family)
        cfg = super().resolve_config(model, args, where)
        if cfg.feature != "pooled" and cfg.form != "reimpl":
            raise ConfigError(f"{where}feature={cfg.feature!r} applies to form=reimpl only; the official forms "
                              f"compare pooled vectors (remove {where}feature or use {where}form=reimpl)")
        return _with_form_defaults(cfg)

    def __init__(self, cfg: BYOTConfig, setup: Setup):
        cfg = _with_form_defaults(cfg)
        super().__init__(cfg, setup)
        _check_family(setup.model, setup.family)
        channels = tuple(setup.stage_channels)
        if len(channels) < 2:
            raise ConfigError(f"method=byot needs a model with at least 2 stages; {setup.model} has {len(channels)}")
        self.alpha = cfg.alpha
        self.heads = nn.ModuleList(AuxHead(channels, s, setup.num_classes, cfg.head, cfg.attention, cfg.attention_bn)
                                   for s in range(len(channels) - 1))
        # adaptation layers of the official feature term: one per shallow head but the deepest
        adapted = cfg.form != "reimpl" and cfg.beta > 0
        self.adaptation = nn.ModuleList(nn.Linear(channels[-1], setup.num_features)
                                        for _ in range(len(self.heads) - 1 if adapted else 0))

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
        if c.form != "reimpl":
            terms = {"ce": ce(z_deep, batch.y) + (1 - a) * ce_aux, "kd": a * kd}
            if len(self.adaptation):
                terms["feat"] = c.beta * sum(adapted_distance(adapt, outs[s][2], feats.pooled)
                                             for s, adapt in enumerate(self.adaptation))
            return terms
        deep = feats.pooled if c.feature == "pooled" else feats.pre_pool
        hints = []
        for _, fmap, pooled in outs:
            h = pooled if c.feature == "pooled" else fmap
            if h.shape != deep.shape:
                raise RuntimeError(f"BYOT head features {tuple(h.shape)} do not match the deepest {tuple(deep.shape)}")
            hints.append(hint_loss(h, deep))
        return {"ce": (1 - a) * (ce(z_deep, batch.y) + ce_aux), "kd": a * c.T * c.T * kd,
                "feat": c.beta * _world() * sum(hints)}
