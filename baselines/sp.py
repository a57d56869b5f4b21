"""SP: similarity-preserving KD (Tung & Mori, ICCV 2019), as RepDistiller's SP (its code says
"verified by original author").

Flatten the tapped map to Q (B, D), D = C*H*W; G = Q Q^T (B x B); row-normalise G (each row divided by
max(||row||_2, 1e-12), so G is no longer symmetric); then

    L_SP = (1/B^2) * ||G_t - G_s||_F^2,      L = gamma * CE + alpha * L_KD + beta * L_SP   (beta 3000)

Tap: the LAST STAGE output after its ReLU and before global pooling (RepDistiller ``feat[-2]``):
``Features.stages[-1]``. That is 512x4x4 for ResNet18/34 and VGG16 (block 4), 2048x4x4 for ResNet50/101,
and 464x4x4 for ShuffleNetV2 -- whose ``Features.pre_pool`` is instead the 1024-channel head conv output
(``tap="pre_pool"`` selects that, for every other zoo model it is the same tensor).

Batch: under DDP the relation is built over the GLOBAL batch by default (``relations="global"``: features
are all-gathered, with gradient to each rank's own rows), so a torchrun run computes the
single-GPU loss; ``"local"`` builds it per rank (what DataParallel did in RepDistiller). Without DDP the
two are identical. A last batch of one sample gives a 1x1 G = [1] on both sides and a zero loss.

Per-step cost: one teacher forward plus the student's forward and backward; the two Gram matrices cost
B^2*D MACs (about 134 M for a ResNet50/101 teacher, D = 32768, and 34 M for ResNet18/34/VGG16, D = 8192,
at B = 64); the stored matrices are B x B. Negligible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ipsd.config import param
from ipsd.dist import relation_rows
from ipsd.method import FeatureKD, register_method
from ipsd.models import Features


@dataclass
class SPConfig:
    gamma: float = param(1.0, lo=0, doc="CE weight (RepDistiller -r 1)")
    alpha: float = param(0.0, lo=0, doc="KD weight (RepDistiller -a 0: SP alone)")
    beta: float = param(3000.0, lo=0, doc="SP weight (RepDistiller -b 3000; mdistiller FEAT_WEIGHT 3000)")
    T: float = param(4.0, lo=0, lo_open=True, doc="KD temperature, used only when alpha > 0")
    tap: str = param("last_stage", choices=("last_stage", "pre_pool"),
                     doc="last_stage = RepDistiller feat[-2] (Features.stages[-1]); pre_pool differs only "
                         "for ShuffleNetV2 (its 1024-ch head conv output)")
    relations: str = param("global", choices=("global", "local"),
                           doc="under DDP: Gram over the all-gathered global batch, or per rank")


def similarity(f: Tensor) -> Tensor:
    """Row-normalised batch Gram matrix (B, B) of the flattened features."""
    q = f.float().flatten(1)
    return F.normalize(q @ q.t(), p=2.0, dim=1)


def sp_loss(f_s: Tensor, f_t: Tensor) -> Tensor:
    """(1/B^2) * ||G_t - G_s||_F^2 with row-normalised Grams (before beta)."""
    b = f_s.shape[0]
    return (similarity(f_t) - similarity(f_s)).pow(2).sum() / (b * b)


def tapped(feat: Features, tap: str) -> Tensor:
    return feat.stages[-1] if tap == "last_stage" else feat.pre_pool


@register_method("sp")
class SP(FeatureKD):
    Config = SPConfig
    term = "sp"

    def feature_loss(self, feat_s: Features, feat_t: Features) -> Tensor:
        c = self.cfg
        return sp_loss(*relation_rows(c.relations, tapped(feat_s, c.tap), tapped(feat_t, c.tap)))
