"""VRM: Virtual Relation Matching (Zhang, Xie, Cai, Ma): the student matches the teacher's relation graphs
(unit difference vectors between logits) across a real and a virtual view of each batch, with unreliable
edges pruned.

The official code was not obtainable: every choice the paper leaves open is a config key, and each key's doc
says whether its default is assumed or inferred. Each image has a real view ``batch.x`` (crop+flip) and a
virtual view ``batch.view2`` (crop+flip, then RandAugment + Cutout on the device, :mod:`ipsd.data.randaugment`;
the ``ra_*`` settings reach the loader through ``Needs.strong_args``). The student runs on both (two separate
calls, as CRLD, so BatchNorm sees each view alone), and so does the frozen teacher (eval mode, no grad:
``setup.teacher``). With z / z~ the real / virtual logits, and the defaults:

    vertices   s = ZSNorm(A(z_s)), s~ = ZSNorm(A(z~_s)) (student; A = 2-layer MLP C -> C -> C with ReLU,
               trained, a child module of the method); t = ZSNorm(z_t), t~ = ZSNorm(z~_t)
               ZSNorm(z) = (z - mean(z)) / (std(z) + 1e-7) per sample over classes (std unbiased, as LSKD;
               the choice is immaterial: it rescales every vertex alike and edges are unit vectors)
    ISV        E_ij = (s_i - s~_j) / (||s_i - s~_j|| + eps)                   (B, B, C), i = j kept
    ICV        w_c = column c of s (over the batch): E_cd = (w_c - w~_d) / (||.|| + eps)    (C, C, B)
    pruning    H_ij = H(p_i) + H(p~_j), p = softmax(z_s / T_H) of the student's RAW logits, detached
               (the entropy of p_i (x) p~_j); ISV edge (i, j) is kept iff H_ij <= the m-th percentile of the
               B^2 values (torch.quantile, linear interpolation, as numpy.percentile); m = 90
    phi        MSE, the mean over the kept edges' entries (|kept| * C for ISV, C^2 * B for ICV)
    L          gamma * (CE(z_s, y) + CE(z~_s, y)) + alpha * phi(E^ISV_S, E^ISV_T) + beta * phi(E^ICV_S, E^ICV_T)

alpha = 128, beta = 32 (Table 5), gamma = 1 (the paper's plain L_ce over both views). Gradient reaches only the
student and its adaptor: the teacher side has none and the pruning entropies use detached student logits. The
paper calls pruned edges "detached"; masking one and detaching it give the same gradient, so only the logged
value depends on the choice, here the kept-edge mean. Terms are logged as ``ce``, ``vrm_isv`` (alpha * phi_ISV)
and ``vrm_icv`` (beta * phi_ICV); ``kd`` (vanilla T^2 KL on the real view) only when ``kd_weight > 0``, which is
not part of VRM (default 0). The graphs are built in fp32 (autocast off for the adaptor and the loss block).

Under DDP the graphs are built over the GLOBAL batch by default (``relations="global"``: vertices and the
pruning logits are all-gathered, with gradient to each rank's own rows), so a torchrun run computes the
single-process loss (BatchNorm statistics stay per rank unless ``sync_bn``); ``"local"`` builds them per rank.

Per-step cost: about 2x KD in backbone compute (two views through both models); the graphs hold B^2 C + C^2 B
entries per model (0.41 M + 0.64 M at B = 64, C = 100), negligible; RandAugment runs batched on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipsd.config import ConfigError, param
from ipsd.data.randaugment import MAX_MAGNITUDE
from ipsd.dist import relation_rows
from ipsd.losses import ce, fp32, kl_t2
from ipsd.method import (
    Batch,
    Method,
    Needs,
    Setup,
    Step,
    forward_views,
    register_method,
)

RA_DEFAULTS = {"fixmatch": {"magnitude": 10, "cutout": 0.5}, "torchvision": {"magnitude": 9, "cutout": 0.0}}
LOADER_DEFAULTS = {"n": 2, "magnitude": 10, "cutout": 0.5, "variant": "fixmatch"}  # rand_augment's defaults


@dataclass
class VRMConfig:
    gamma: float = param(1.0, lo=0, doc="CE weight (the paper's plain L_ce)")
    ce_views: str = param("sum", choices=("sum", "mean"),
                          doc="assumed: CE of the real and virtual views summed (as CRLD); mean halves it")
    alpha: float = param(128.0, lo=0, doc="ISV weight (Table 5: 32..512, best 128)")
    beta: float = param(32.0, lo=0, doc="ICV weight (Table 5: 8..128; 32 chosen 'in favour of generalisation')")
    kd_weight: float = param(0.0, lo=0, doc="optional vanilla KD on the real view; not part of VRM (0 = off)")
    T: float = param(4.0, lo=0, lo_open=True, doc="KD temperature, used only when kd_weight > 0")
    adaptor: bool = param(True, doc="assumed: student logits pass a trained 2-layer MLP (ReLU) before the graphs")
    adaptor_hidden: int | None = param(None, lo=1, doc="hidden width of the adaptor; null = C (classes)")
    zsnorm: bool = param(True, doc="assumed: ZSNorm (z - mean)/(std + 1e-7) on teacher and student vertices")
    edge_eps: float = param(1e-8, lo=0, doc="assumed: added to every edge's norm")
    distance: str = param("mse", choices=("mse", "smoothl1", "l1", "cosine"),
                          doc="assumed: phi; mse/smoothl1 (beta 1)/l1: mean over kept entries; cosine: mean over "
                              "kept edges of 1 - cos")
    prune_m: float = param(90.0, lo=0, hi=100, doc="assumed: keep ISV edges with joint entropy <= this "
                                                   "percentile (100 = no pruning)")
    prune_icv: bool = param(False, doc="assumed off: prune ICV edges (c, d) by H(q_c) + H(q~_d), q_c = softmax "
                                   "over the batch of logit column c / entropy_T (either ICV reading)")
    joint_entropy: str = param("product", choices=("product", "mixture"),
                               doc="assumed: product: H(p_i) + H(p~_j); mixture: H((p_i + p~_j)/2)")
    entropy_T: float = param(1.0, lo=0, lo_open=True, doc="assumed: softmax temperature of the pruning entropy")
    icv_vertices: str = param("mirror", choices=("mirror", "difference"),
                              doc="inferred: ICV mirrors ISV over logit columns; or edges normalize(v_c - v_d) "
                                  "between v_c = w_c - w~_c (zero at c = d)")
    student_forward: str = param("separate", choices=("separate", "joint"),
                                 doc="two student calls (BN per view, as CRLD) or one on the concatenation")
    relations: str = param("global", choices=("global", "local"),
                           doc="under DDP: graphs over the all-gathered global batch, or per rank")
    ra_variant: str = param("fixmatch", choices=("fixmatch", "torchvision"),
                            doc="inferred: virtual-view RandAugment: FixMatch/CRLD RandAugment(2,10)+Cutout, "
                                "or torchvision RandAugment(2, 9) without Cutout")
    ra_n: int = param(2, lo=0, doc="RandAugment ops per image (Table 5: n = 2 best)")
    ra_magnitude: int | None = param(None, lo=0, doc="magnitude; null = 10 (fixmatch, max 10) / 9 "
                                                     "(torchvision, max 30)")
    ra_cutout: float | None = param(None, lo=0, hi=1, doc="max Cutout side / image side; null = 0.5 "
                                                         "(fixmatch) / 0 (torchvision)")


# ------------------------------------------------------------------------------------------ graph pieces

def zsnorm(z: Tensor, eps: float = 1e-7) -> Tensor:
    """Per-sample z-score over classes: (z - mean) / (std + eps), unbiased std (as LSKD's normalisation)."""
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + eps)


def unit_differences(a: Tensor, b: Tensor, eps: float) -> Tensor:
    """(n, D), (m, D) -> (n, m, D): (a_i - b_j) / (||a_i - b_j|| + eps)."""
    d = a[:, None, :] - b[None, :, :]
    return d / (d.norm(dim=-1, keepdim=True) + eps)


def isv_edges(z: Tensor, zv: Tensor, eps: float = 1e-8) -> Tensor:
    """Inter-sample cross-view edges (B, B, C) between real vertices z_i and virtual vertices zv_j."""
    return unit_differences(z, zv, eps)


def icv_edges(z: Tensor, zv: Tensor, eps: float = 1e-8, vertices: str = "mirror") -> Tensor:
    """Inter-class cross-view edges (C, C, B) built from the logit columns (batch-wise affinity vectors)."""
    w, wv = z.t(), zv.t()
    if vertices == "mirror":
        return unit_differences(w, wv, eps)
    v = w - wv
    return unit_differences(v, v, eps)


def joint_entropy(z: Tensor, zv: Tensor, T: float = 1.0, kind: str = "product") -> Tensor:
    """(n, K), (m, K) logits -> (n, m) "joint entropy" of row i's and row j's softmax predictions."""
    logp, logq = F.log_softmax(z / T, -1), F.log_softmax(zv / T, -1)
    if kind == "product":  # entropy of the product distribution p_i (x) q_j
        h = lambda lp: -(lp.exp() * lp).sum(-1)
        return h(logp)[:, None] + h(logq)[None, :]
    mix = 0.5 * (logp.exp()[:, None, :] + logq.exp()[None, :, :])
    return -(mix * mix.clamp_min(1e-30).log()).sum(-1)


def keep_mask(h: Tensor, m: float) -> Tensor:
    """Edges whose entropy is <= the m-th percentile of all of them (linear interpolation, as numpy)."""
    if m >= 100:
        return torch.ones_like(h, dtype=torch.bool)
    threshold = torch.quantile(h.flatten().float(), m / 100.0)
    return h <= threshold


def edge_distance(es: Tensor, et: Tensor, keep: Tensor | None = None, kind: str = "mse") -> Tensor:
    """phi between two edge tensors (..., D), averaged over the kept edges (all when ``keep`` is None)."""
    w = torch.ones(es.shape[:-1], device=es.device) if keep is None else keep.to(es.dtype)
    if kind == "cosine":
        per_edge = 1 - F.cosine_similarity(es, et, dim=-1, eps=1e-8)
        return (per_edge * w).sum() / w.sum().clamp_min(1)
    if kind == "mse":
        per_entry = (es - et).square()
    elif kind == "l1":
        per_entry = (es - et).abs()
    else:
        per_entry = F.smooth_l1_loss(es, et, reduction="none", beta=1.0)
    return (per_entry * w[..., None]).sum() / (w.sum().clamp_min(1) * es.shape[-1])


# ------------------------------------------------------------------------------------------------ method

@register_method("vrm")
class VRM(Method):
    Config = VRMConfig
    needs_teacher = True

    @classmethod
    def needs_for(cls, cfg: VRMConfig) -> Needs:
        return Needs(views=2, strong_view2=True, **cls._strong_args(cfg))

    @classmethod
    def train_views(cls, cfg: VRMConfig) -> int:
        return 2

    def __init__(self, cfg: VRMConfig, setup: Setup):
        super().__init__(cfg, setup)
        c = setup.num_classes
        self.adaptor = None
        if cfg.adaptor and (cfg.alpha > 0 or cfg.beta > 0):
            hidden = cfg.adaptor_hidden or c
            self.adaptor = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, c))

    @staticmethod
    def _strong_args(cfg: VRMConfig) -> dict:
        """The virtual view's RandAugment settings as the loader's ``Needs`` field, if it has one."""
        variant = cfg.ra_variant
        ra = {"n": cfg.ra_n, "variant": variant,
              "magnitude": RA_DEFAULTS[variant]["magnitude"] if cfg.ra_magnitude is None else cfg.ra_magnitude,
              "cutout": RA_DEFAULTS[variant]["cutout"] if cfg.ra_cutout is None else cfg.ra_cutout}
        if ra["magnitude"] > MAX_MAGNITUDE[variant]:
            raise ConfigError(f"method_args.ra_magnitude={ra['magnitude']} is out of range for "
                              f"ra_variant={variant!r}; allowed [0, {MAX_MAGNITUDE[variant]}]")
        return {} if ra == LOADER_DEFAULTS else {"strong_args": tuple(sorted(ra.items()))}

    def vertices(self, z: Tensor) -> Tensor:
        """Student logits -> graph vertices: adaptor, then ZSNorm (fp32)."""
        if self.adaptor is not None:
            z = self.adaptor(z)
        return zsnorm(z) if self.cfg.zsnorm else z

    def forward(self, model: nn.Module, batch: Batch, step: Step) -> dict[str, Tensor]:
        c = self.cfg
        if batch.view2 is None:
            raise ValueError("vrm needs batch.view2 (the virtual view); the loader must honour Needs(views=2)")
        z, zv = forward_views(model, batch.x, batch.view2, joint=c.student_forward == "joint")
        t, tv = self.teacher(batch.x), self.teacher(batch.view2)
        ce_sum = ce(z, batch.y) + ce(zv, batch.y)
        terms = {"ce": c.gamma * (ce_sum if c.ce_views == "sum" else 0.5 * ce_sum)}
        if c.kd_weight > 0:
            terms["kd"] = c.kd_weight * kl_t2(t, z, c.T)
        if c.alpha > 0 or c.beta > 0:
            with fp32(z):
                isv, icv = self.relation_losses(z.float(), zv.float(), t.float(), tv.float())
            if c.alpha > 0:
                terms["vrm_isv"] = c.alpha * isv
            if c.beta > 0:
                terms["vrm_icv"] = c.beta * icv
        return terms

    def relation_losses(self, z: Tensor, zv: Tensor, t: Tensor, tv: Tensor) -> tuple[Tensor, Tensor]:
        """(phi_ISV, phi_ICV) from the student's (z, zv) and the teacher's (t, tv) logits of both views."""
        c = self.cfg
        s, sv = self.vertices(z), self.vertices(zv)
        if c.zsnorm:
            t, tv = zsnorm(t), zsnorm(tv)
        raw, raw_v = z.detach(), zv.detach()  # pruning uses the student's own predictions, no gradient
        s, sv, t, tv, raw, raw_v = relation_rows(c.relations, s, sv, t, tv, raw, raw_v)
        keep = keep_mask(joint_entropy(raw, raw_v, c.entropy_T, c.joint_entropy), c.prune_m)
        isv = edge_distance(isv_edges(s, sv, c.edge_eps), isv_edges(t, tv, c.edge_eps), keep, c.distance)
        keep_icv = None
        if c.prune_icv:
            keep_icv = keep_mask(joint_entropy(raw.t(), raw_v.t(), c.entropy_T, c.joint_entropy), c.prune_m)
        icv = edge_distance(icv_edges(s, sv, c.edge_eps, c.icv_vertices), icv_edges(t, tv, c.edge_eps, c.icv_vertices),
                            keep_icv, c.distance)
        return isv, icv
