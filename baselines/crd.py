"""CRD: Contrastive Representation Distillation (Tian et al., ICLR 2020), as RepDistiller implements it.

The pooled penultimate vectors of student and (frozen) teacher pass through two trainable linear
embeddings + L2 normalisation (``embed_s``: D_s -> 128, ``embed_t``: D_t -> 128). They are ``nn.Module``
children of the method, so the engine's SGD trains and weight-decays them and DDP synchronises them
like the model; the teacher backbone stays frozen. Two memory banks (N x 128, fp32, persistent
buffers) hold the student (``memory_s``, RepDistiller ``memory_v1``) and teacher (``memory_t``,
``memory_v2``) embeddings of every training sample. For each anchor, index list J = (positive,
K negatives); scores

    v_ik = exp(<M_t[J_ik], g_s(x_i)> / tau) / Z_s     (student-anchored; reaches the student and W_s)
    u_ik = exp(<M_s[J_ik], g_t(x_i)> / tau) / Z_t     (teacher-anchored; reaches W_t)

and the NCE loss with uniform noise P_n = 1/N, h(s) = s / (s + K/N + eps), eps = 1e-7:

    l(s) = -(1/B) sum_i [log h(s_i0) + sum_k log(1 - h(s_ik))],    L_crd = beta * (l(v) + l(u)).

1 - h(s) is taken literally as (K/N + eps) / (s + K/N + eps); RepDistiller's code writes the numerator
as K/N, which shifts the loss by a constant ~eps*N per sample and has the same gradient.
Z_s, Z_t start at -1 and are fixed at the first training step to N * mean(exp(score / tau)) over that
step's scores (persistent buffers: checkpointed, so a resumed run keeps them). After scoring, without
gradient, M[index] <- normalize(m * M[index] + (1 - m) * g) for both banks.

Contrast indices ("exact", RepDistiller's default): positive = the anchor's own dataset index; K
negatives drawn uniformly without replacement from the samples of other classes (with replacement
only for a class whose pool is smaller than K). "relax": the positive is a uniformly drawn sample of
the anchor's class (possibly itself, as in RepDistiller). The sampler runs on the batch's device with
``step.generator``: every row gets i.i.d. 62-bit integer keys for all N samples (the anchor's class
masked out) and keeps the K smallest (``topk``) -- a uniform K-subset, with no duplicates and no
same-class index by construction, no per-sample loop. The class of every training index comes from
``setup.train_labels`` (all of them, from step 1 on).

Autocast is disabled from the embeddings onward (exp(score/0.07) reaches ~1.6e6, beyond fp16).
The scores are by default computed as g @ M^T (B x N, then the J columns are picked): the same dot
products as RepDistiller's gather of B x (1+K) bank rows, without its ~1 GiB transient copy at B=64
(N*B*d MACs instead: 0.4 GMAC on CIFAR-100). ``scores=gather`` is the literal form.

DDP: every rank all-gathers (indices, g_s, g_t) each step and applies the same bank update, so the
banks stay identical on all ranks (the loader's rank shards are disjoint and equal-sized); the banks
are broadcast from rank 0 once at the first step. Z is computed from the global scores (sums and
counts all-reduced over ranks), i.e. the mean a single process would see over the global batch, up to
the negatives drawn (each rank draws its own with its per-rank generator). The banks are method
buffers, so DDP neither broadcasts nor syncs them (``ddp_ignored``).

Assumptions: the KD term (``alpha``, temperature ``T`` = 4) is only computed when alpha > 0 (it is
unused at the default alpha = 0). Bank initialisation draws from the global RNG at construction,
like the heads' weights (seeded identically on every rank by the engine).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipsd import dist
from ipsd.config import ConfigError, param
from ipsd.losses import ce, kl_t2
from ipsd.method import Batch, Method, Setup, Step, register_method

NCE_EPS = 1e-7  # eps of h(s) = s / (s + K/N + eps) (RepDistiller criterion.py)
KEY_RANGE = 1 << 62  # sampler keys are uniform integers in [0, KEY_RANGE); masked entries get KEY_RANGE


@dataclass
class CRDConfig:
    gamma: float = param(1.0, lo=0, doc="CE weight (RepDistiller -r)")
    alpha: float = param(0.0, lo=0, doc="KD weight (RepDistiller -a; 0 = CRD alone, 1 = 'CRD+KD')")
    beta: float = param(0.8, lo=0, doc="CRD weight (RepDistiller -b)")
    T: float = param(4.0, lo=0, lo_open=True, doc="KD temperature, used only when alpha > 0")
    feat_dim: int = param(128, lo=1, doc="embedding width of both heads and both memory banks")
    nce_k: int = param(16384, lo=1, doc="negatives per anchor")
    nce_t: float = param(0.07, lo=0, lo_open=True, doc="temperature tau of the scores")
    nce_m: float = param(0.5, lo=0, hi=1, doc="momentum of the memory-bank update")
    mode: str = param("exact", choices=("exact", "relax"),
                      doc="positive = the anchor's own index (exact) or a random same-class sample (relax)")
    scores: str = param("matmul", choices=("matmul", "gather"),
                        doc="how <M[J_ik], g_i> is computed (same dot products): matmul = g @ M^T (B x N) then pick "
                            "J; gather = RepDistiller's copy of the B x (1+K) x d bank rows (~1 GiB at B=64) then bmm")


class ClassTable:
    """Training indices grouped by class: ``order`` lists indices class by class; class c occupies
    ``order[start[c] : start[c] + count[c]]``. ``pool_min``/``pool_max``: the fewest/most other-class
    samples any present class has (Python ints, so drawing needs no device sync)."""

    def __init__(self, order: Tensor, start: Tensor, count: Tensor, pool_min: int, pool_max: int):
        self.order, self.start, self.count = order, start, count
        self.pool_min, self.pool_max = pool_min, pool_max
        self.max_count = len(order) - pool_min

    @classmethod
    def from_labels(cls, labels: Tensor, num_classes: int) -> ClassTable:
        labels = labels.long()
        count = torch.bincount(labels, minlength=num_classes)
        present = count[count > 0]
        n = len(labels)
        return cls(torch.argsort(labels, stable=True), torch.cumsum(count, 0) - count, count,
                   n - int(present.max()), n - int(present.min()))


def draw_negatives(cls: Tensor, k: int, table: ClassTable, g: torch.Generator) -> Tensor:
    """(B, k) training indices, row i uniform over samples NOT of class ``cls[i]`` (a class that has
    samples): without replacement when that pool holds at least k samples, else with replacement.
    Vectorised, on ``g``'s device; no device sync."""
    order, start, count = table.order, table.start, table.count
    n, b = len(order), len(cls)
    lo, size = start[cls][:, None], count[cls][:, None]
    pool = n - size  # (B, 1) other-class samples per row
    pool_min, pool_max = table.pool_min, table.pool_max
    if pool_min < 1:
        raise ValueError("CRD needs at least two classes in the training set")
    exact = None
    if k <= pool_max:  # some (usually all) rows can draw without replacement
        keys = torch.randint(0, KEY_RANGE, (b, n), generator=g, device=g.device)
        # mask the anchor's own class block order[lo : lo + size] (short rows repeat their last column)
        block = lo + torch.minimum(torch.arange(table.max_count, device=g.device), size - 1)
        keys.scatter_(1, block, KEY_RANGE)
        exact = order[keys.topk(k, dim=1, largest=False, sorted=False).indices]
        if k <= pool_min:
            return exact
    # with replacement: a uniform position in the pool, skipping the anchor's class block
    r = (torch.rand(b, k, generator=g, device=g.device, dtype=torch.float64) * pool).long()
    r = torch.minimum(r, pool - 1)
    repl = order[r + size * (r >= lo)]
    return repl if exact is None else torch.where(pool < k, repl, exact)


def draw_same_class(cls: Tensor, table: ClassTable, g: torch.Generator) -> Tensor:
    """(B,) training indices, each uniform over the samples of class ``cls[i]`` (itself included)."""
    size = table.count[cls]
    r = (torch.rand(len(cls), generator=g, device=g.device, dtype=torch.float64) * size).long()
    return table.order[table.start[cls] + torch.minimum(r, size - 1)]


def nce_loss(s: Tensor, n_data: int) -> Tensor:
    """NCE with uniform noise: s (B, 1 + K) normalised scores, column 0 the positive."""
    b, k = s.shape[0], s.shape[1] - 1
    kpn = k / n_data
    log_pos = torch.log(s[:, 0] / (s[:, 0] + kpn + NCE_EPS))
    log_neg = math.log(kpn + NCE_EPS) - torch.log(s[:, 1:] + kpn + NCE_EPS)  # log(1 - h(s))
    return -(log_pos.sum() + log_neg.sum()) / b


@register_method("crd")
class CRD(Method):
    Config = CRDConfig
    needs_teacher = True
    cost_note = "2B(K+1)x128 memory-bank gather"

    def __init__(self, cfg: CRDConfig, setup: Setup):
        super().__init__(cfg, setup)
        teacher = self.teacher
        labels = setup.train_labels
        if labels is None:
            raise ConfigError("crd needs the class of every training index (setup.train_labels)")
        labels = torch.as_tensor(labels).long().cpu()
        if labels.shape != (setup.train_size,):
            raise ConfigError(f"crd: setup.train_labels has shape {tuple(labels.shape)}, "
                              f"expected ({setup.train_size},) (one label per training index)")
        table = ClassTable.from_labels(labels, max(setup.num_classes, int(labels.max()) + 1))
        if table.pool_min < 1:
            raise ConfigError("crd draws negatives from other classes: the training set needs at least 2 classes")
        self.n_data = setup.train_size
        d = cfg.feat_dim
        self.embed_s = nn.Linear(setup.num_features, d)
        self.embed_t = nn.Linear(int(teacher.model.num_features), d)
        a = 1.0 / math.sqrt(d / 3)  # rows of unit expected squared norm
        self.register_buffer("memory_s", torch.rand(self.n_data, d).mul_(2 * a).sub_(a))
        self.register_buffer("memory_t", torch.rand(self.n_data, d).mul_(2 * a).sub_(a))
        self.register_buffer("z_s", torch.tensor(-1.0))  # normalises v (student-anchored)
        self.register_buffer("z_t", torch.tensor(-1.0))  # normalises u (teacher-anchored)
        # derived from the data, rebuilt at construction: not checkpointed
        self.register_buffer("_order", table.order, persistent=False)
        self.register_buffer("_start", table.start, persistent=False)
        self.register_buffer("_count", table.count, persistent=False)
        self.register_buffer("_label", labels, persistent=False)
        self._pools = (table.pool_min, table.pool_max)
        self._z_fixed: bool | None = None  # cache of (Z > 0): avoids a device sync per step
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_z_fixed", None))

    @property
    def table(self) -> ClassTable:
        return ClassTable(self._order, self._start, self._count, *self._pools)

    def contrast_indices(self, index: Tensor, g: torch.Generator) -> Tensor:
        """(B, 1 + K) bank rows to score per anchor: the positive, then K other-class negatives."""
        cls = self._label[index]
        pos = index if self.cfg.mode == "exact" else draw_same_class(cls, self.table, g)
        return torch.cat([pos[:, None], draw_negatives(cls, self.cfg.nce_k, self.table, g)], dim=1)

    def _exp_scores(self, bank: Tensor, idx: Tensor, anchor: Tensor) -> Tensor:
        """exp(<bank[idx_ik], anchor_i> / tau), (B, 1 + K); bank rows carry no gradient."""
        if self.cfg.scores == "matmul":
            dots = (anchor @ bank.T).gather(1, idx)
        else:
            rows = bank.index_select(0, idx.reshape(-1)).view(*idx.shape, bank.shape[1])
            dots = torch.bmm(rows, anchor.unsqueeze(2)).squeeze(2)
        return torch.exp(dots / self.cfg.nce_t)

    def _fix_z(self, v: Tensor, u: Tensor) -> None:
        """First training step: Z = N * mean(exp(score / tau)) over the global step's scores."""
        stats = torch.stack([v.detach().sum(), u.detach().sum(), v.new_tensor(float(v.numel()))]).double()
        dist.all_reduce_sum(stats)
        self.z_s.fill_(self.n_data * float(stats[0] / stats[2]))
        self.z_t.fill_(self.n_data * float(stats[1] / stats[2]))
        self._z_fixed = True

    @torch.no_grad()
    def _update_banks(self, index: Tensor, g_s: Tensor, g_t: Tensor) -> None:
        """M[index] <- normalize(m M[index] + (1 - m) g) with every rank's rows, identically on all ranks."""
        index = dist.all_gather_cat(index)
        m = self.cfg.nce_m
        for name, g in (("memory_s", dist.all_gather_cat(g_s)), ("memory_t", dist.all_gather_cat(g_t))):
            bank = getattr(self, name)
            rows = F.normalize(bank.index_select(0, index).mul_(m).add_(g, alpha=1.0 - m), dim=1)
            if self.cfg.scores == "matmul":  # autograd keeps the old bank for g @ M^T's backward: no in-place
                setattr(self, name, bank.index_copy(0, index, rows))
            else:
                bank.index_copy_(0, index, rows)

    def forward(self, model: nn.Module, batch: Batch, step: Step) -> dict[str, Tensor]:
        c = self.cfg
        logits, feats = model(batch.x, features=True)
        t_logits, t_feats = self.teacher(batch.x, features=True)
        losses = {"ce": c.gamma * ce(logits, batch.y)}
        if c.alpha > 0:
            losses["kd"] = c.alpha * kl_t2(t_logits, logits, c.T)
        if self._z_fixed is None:
            self._z_fixed = bool(self.z_s.item() > 0)
        first = not self._z_fixed
        if first:
            dist.broadcast_buffers(self)  # first step of a fresh run: every rank starts from rank 0's banks
        idx = self.contrast_indices(batch.index, step.generator)
        with torch.autocast(batch.x.device.type, enabled=False):
            g_s = F.normalize(self.embed_s(feats.pooled.float()), dim=1)
            g_t = F.normalize(self.embed_t(t_feats.pooled.float()), dim=1)
            v = self._exp_scores(self.memory_t, idx, g_s)
            u = self._exp_scores(self.memory_s, idx, g_t)
            if first:
                self._fix_z(v, u)
            crd = nce_loss(v / self.z_s, self.n_data) + nce_loss(u / self.z_t, self.n_data)
            self._update_banks(batch.index, g_s.detach(), g_t.detach())
        losses["crd"] = c.beta * crd
        return losses

    def log_values(self, step: Step) -> dict[str, float]:
        return {"crd_z_s": float(self.z_s), "crd_z_t": float(self.z_t)}
