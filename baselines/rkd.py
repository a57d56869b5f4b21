"""RKD: relational KD, distance + angle (Park et al., CVPR 2019), as RepDistiller's RKD.

On the flattened embeddings e_i (tap: ``Features.pooled``, the global-average-pooled penultimate vector
that feeds the classifier -- RepDistiller ``feat[-1]``; 2048-d for ResNet50/101, 512-d for ResNet18/34
and VGG16):

- distance: d_ij = sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, 1e-12)), diagonal forced to 0, divided by
  mu = mean{d_ij : d_ij > 0}. The student's gradient flows through mu; the teacher side has none.
  L_D = SmoothL1(d^s/mu_s, d^t/mu_t) averaged over all B^2 entries (zero diagonal included).
- angle: u_{a->b} = (e_b - e_a) / max(|e_b - e_a|, 1e-12) (the zero vector when a == b) and
  theta_abc = <u_{a->b}, u_{a->c}>, the cosine at vertex a, for all B^3 triples;
  L_A = SmoothL1(theta^s, theta^t) averaged over the B^3 entries.
- SmoothL1 with threshold 1: 0.5 x^2 if |x| < 1 else |x| - 0.5.

    L_RKD = 25 L_D + 50 L_A   (internal weights),   L = gamma * CE + alpha * L_KD + beta * L_RKD   (beta 1)

Not torchdistill's ImageNet sample (unpooled layer4, weights 1 and 2): a different method instance.
mu is computed as sum(d) / #(d > 0), equal to the masked mean because non-positive entries are exactly
the zero diagonal, without a device sync; with a single sample (B = 1) both terms are 0.
Under DDP the relations are built over the all-gathered global batch by default (``relations="global"``;
see sp.py), so torchrun computes the single-GPU loss; ``"local"`` keeps them per rank.

Per-step cost: one teacher forward plus the student's forward and backward; the angle term builds a
B x B x D difference tensor (8.4 M floats, 32 MiB, for a 2048-d teacher; 2.1 M for a 512-d student,
kept for the backward) and takes B^3*D MACs (0.54 G teacher, no gradient; 0.13 G student forward) at
B = 64: small next to the backbones (about 190-306 GMAC per step), but memory is O(B^2 D) and compute
grows as B^3 with the batch size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ipsd.config import param
from ipsd.dist import relation_rows
from ipsd.method import FeatureKD, register_method
from ipsd.models import Features


@dataclass
class RKDConfig:
    gamma: float = param(1.0, lo=0, doc="CE weight (RepDistiller -r 1)")
    alpha: float = param(0.0, lo=0, doc="KD weight (RepDistiller -a 0: RKD alone)")
    beta: float = param(1.0, lo=0, doc="RKD weight (RepDistiller -b 1)")
    T: float = param(4.0, lo=0, lo_open=True, doc="KD temperature, used only when alpha > 0")
    w_dist: float = param(25.0, lo=0, doc="internal weight of the distance term (RepDistiller 25)")
    w_angle: float = param(50.0, lo=0, doc="internal weight of the angle term (RepDistiller 50)")
    relations: str = param("global", choices=("global", "local"),
                           doc="under DDP: relations over the all-gathered global batch, or per rank")


def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """(B, B) Euclidean distances via the expanded square, clamped at eps before the root, diagonal 0."""
    sq = e.pow(2).sum(1)
    d = (sq[:, None] + sq[None, :] - 2.0 * (e @ e.t())).clamp_min(eps).sqrt()
    eye = torch.eye(len(e), dtype=torch.bool, device=e.device)
    return d.masked_fill(eye, 0.0)


def normalised_distances(e: Tensor) -> Tensor:
    """Distances divided by their mean over the positive entries (the gradient flows through the mean)."""
    d = pairwise_distances(e)
    mu = d.sum() / (d > 0).sum().clamp_min(1)  # = mean{d > 0}: only the zero diagonal is not positive
    return d / mu.clamp_min(1e-12)  # B = 1: d = 0 and mu = 0, so 0 / 1e-12 = 0


def angles(e: Tensor) -> Tensor:
    """(B, B, B): [a, b, c] = <u_{a->b}, u_{a->c}>, the cosine at vertex a (0 when b or c equals a)."""
    u = F.normalize(e[None, :, :] - e[:, None, :], p=2.0, dim=2)  # u[a, b] = unit(e_b - e_a)
    return torch.bmm(u, u.transpose(1, 2))


def rkd_loss(e_s: Tensor, e_t: Tensor, w_dist: float = 25.0, w_angle: float = 50.0) -> Tensor:
    """w_dist * L_D + w_angle * L_A (before beta); the teacher side is computed without gradient."""
    e_s, e_t = e_s.float().flatten(1), e_t.float().flatten(1)
    loss = e_s.new_zeros(())
    if w_dist > 0:
        with torch.no_grad():
            d_t = normalised_distances(e_t)
        loss = loss + w_dist * F.smooth_l1_loss(normalised_distances(e_s), d_t, beta=1.0)
    if w_angle > 0:
        with torch.no_grad():
            a_t = angles(e_t)
        loss = loss + w_angle * F.smooth_l1_loss(angles(e_s), a_t, beta=1.0)
    return loss


@register_method("rkd")
class RKD(FeatureKD):
    Config = RKDConfig
    cost_note = "B^3 D angle term"
    term = "rkd"

    def feature_loss(self, feat_s: Features, feat_t: Features) -> Tensor:
        c = self.cfg
        return rkd_loss(*relation_rows(c.relations, feat_s.pooled, feat_t.pooled), c.w_dist, c.w_angle)
