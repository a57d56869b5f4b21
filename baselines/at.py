"""AT: attention transfer (Zagoruyko & Komodakis, ICLR 2017).

Default ``mode="code"`` is the variant every CIFAR benchmark implements (RepDistiller, mdistiller,
torchdistill ``mode='code'``) and the one beta = 1000 is calibrated for. For a map f (B, C, H, W):

    q(f) = mean_c |f_c|^p  (p = 2), flattened to H*W;   a(f) = q / max(||q||_2, 1e-12)
    l    = mean over the B*H*W entries of (a(f_s) - a(f_t))^2          (an elementwise mean)
    L    = gamma * CE + alpha * L_KD + beta * sum over stage pairs of l

``mode="paper"`` is Eq. 2 of the paper: q sums over channels (the normalisation makes mean and sum give
the same a), and each pair contributes (1/2) * ||a(f_s) - a(f_t)||_2 -- the norm, NOT squared --
averaged over the batch (torchdistill's ``mode='paper'`` divides by the batch size the same way); the
1/2 is the paper's beta/2. beta = 1000 was not tuned for this form: pass your own.

Taps: ``Features.stages`` (RepDistiller ``feat[1:-1]``: every stage output after its final ReLU, not
pooled). Pairs are matched by stage INDEX, as RepDistiller does, not by resolution (which would pair
differently). When the two maps of a pair differ spatially, the larger one (teacher or student) is
adaptive-average-pooled to the smaller before q is computed, to (h, h) with h the smaller HEIGHT
(RepDistiller pools with the height for both dimensions; all zoo maps are square). For ResNet101 -> VGG16
this pools the teacher's first three maps 32->16, 16->8, 8->4; the last pair is 4x4 vs 4x4. Channel counts
never need to match.
Assumed: when teacher and student have different numbers of stages (e.g. a 4-stage ResNet50 teacher and
a 3-stage CIFAR ResNet student), RepDistiller's ``zip`` pairs the first min(n_s, n_t) stages; that is
``unequal_stages="first"``; ``"last"`` pairs the deepest ones instead. The Table-4 pairs (4 vs 4) never
hit this.

Under DDP nothing needs gathering: the loss is a per-sample mean and the loader gives every rank an
equal shard, so DDP's gradient average equals the single-process gradient.

Per-step cost: one teacher forward plus the student's forward and backward; the loss is an elementwise
pass over the tapped maps (about 0.5 M values per image for a ResNet50 teacher), negligible.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from ipsd.config import param
from ipsd.method import FeatureKD, register_method
from ipsd.models import Features


@dataclass
class ATConfig:
    gamma: float = param(1.0, lo=0, doc="CE weight (RepDistiller -r 1)")
    alpha: float = param(0.0, lo=0, doc="KD weight (RepDistiller -a 0: AT alone)")
    beta: float = param(1000.0, lo=0, doc="AT weight (RepDistiller -b 1000; calibrated for mode=code)")
    T: float = param(4.0, lo=0, lo_open=True, doc="KD temperature, used only when alpha > 0")
    p: float = param(2.0, lo=0, lo_open=True, doc="power of the activations in the attention map (RepDistiller 2)")
    mode: str = param("code", choices=("code", "paper"),
                      doc="code: channel-mean, squared difference, elementwise mean (beta 1000); "
                          "paper: channel-sum, (1/2)*||.||_2 not squared, batch mean (Eq. 2)")
    unequal_stages: str = param("first", choices=("first", "last"),
                                doc="assumed: if teacher/student stage counts differ: pair the first "
                                    "min(n_s, n_t) stages (RepDistiller's zip) or the deepest ones")


def match_spatial(f_s: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Pool the spatially larger map of a pair to the smaller one's height (for both dimensions)."""
    h_s, h_t = f_s.shape[2], f_t.shape[2]
    if h_s > h_t:
        f_s = F.adaptive_avg_pool2d(f_s, (h_t, h_t))
    elif h_t > h_s:
        f_t = F.adaptive_avg_pool2d(f_t, (h_s, h_s))
    return f_s, f_t


def attention_map(f: Tensor, p: float, mode: str) -> Tensor:
    """(B, C, H, W) -> (B, H*W): L2-normalised channel-mean (code) or channel-sum (paper) of |f|^p."""
    q = f.abs().pow(p)
    q = q.mean(1) if mode == "code" else q.sum(1)
    return F.normalize(q.flatten(1), p=2.0, dim=1)


def stage_pairs(s: list[Tensor], t: list[Tensor], unequal: str) -> list[tuple[Tensor, Tensor]]:
    """Student/teacher stage maps matched by index (see the module docstring for unequal counts)."""
    n = min(len(s), len(t))
    if unequal == "last":
        return list(zip(s[len(s) - n:], t[len(t) - n:]))
    return list(zip(s[:n], t[:n]))


def at_pair_loss(f_s: Tensor, f_t: Tensor, p: float = 2.0, mode: str = "code") -> Tensor:
    """One stage pair's AT loss (before beta)."""
    f_s, f_t = match_spatial(f_s.float(), f_t.float())
    diff = attention_map(f_s, p, mode) - attention_map(f_t, p, mode)
    if mode == "code":
        return diff.pow(2).mean()
    return 0.5 * diff.norm(p=2, dim=1).mean()


@register_method("at")
class AT(FeatureKD):
    Config = ATConfig
    term = "at"

    def feature_loss(self, feat_s: Features, feat_t: Features) -> Tensor:
        c = self.cfg
        return sum(at_pair_loss(fs, ft, c.p, c.mode) for fs, ft in stage_pairs(feat_s.stages, feat_t.stages,
                                                                                c.unequal_stages))
