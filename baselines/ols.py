"""OLS: Online Label Smoothing (Zhang et al., TIP 2021; `zhangchbin/OnlineLabelSmoothing`).

Each class c gets a soft label S_c: the mean softmax of the training samples of class c that the
model classified correctly during the previous epoch. Training minimises
``(1 - alpha) * CE(z, y) + alpha * H(S[y], softmax(z))`` (T = 1), alpha = 0.5 as hard-coded in the
official CIFAR script (``train_cifar_all_methods.py``; its ``--olsalpha`` flag is parsed but unused).

State (persistent buffers, so checkpointed and restored on resume):
  * ``soft_labels`` S (C x C), initialised to **zero**, so epoch 1 trains with (1 - alpha) * CE only;
  * ``sums`` A (C x C) and ``counts`` n (C), the current epoch's statistics, reset at every epoch start.
Statistics use the (no-grad) softmax of the same training-mode logits of the augmented batch the
loss uses. At epoch end ``S_c = A_c / n_c`` if ``n_c > 0`` else uniform ``1/C``; there is no smoothing
across epochs. Under DDP, A and n are summed over ranks before S is updated, so all ranks hold the
same S (each rank sees a disjoint share of the epoch).

Implementation details: "correct" is ``argmax(z) == y`` (first index wins on ties; the
official code uses ``argsort(desc)[0]``, equivalent up to tie-breaking). Accumulation uses
``index_add_``: exact fp32 on CPU; on CUDA the order of the atomic adds (and so the last ulp of A)
is not deterministic unless ``torch.use_deterministic_algorithms(True)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ipsd import dist
from ipsd.config import param
from ipsd.losses import ce, soft_ce
from ipsd.method import Method, Setup, register_method


@dataclass
class OLSConfig:
    alpha: float = param(0.5, lo=0, hi=1,
                         doc="weight of the soft-label term; CE gets 1 - alpha (official CIFAR code: 0.5 / 0.5)")


@register_method("ols")
class OLS(Method):
    Config = OLSConfig

    def __init__(self, cfg: OLSConfig, setup: Setup):
        super().__init__(cfg, setup)
        c = setup.num_classes
        self.register_buffer("soft_labels", torch.zeros(c, c))  # S: row y is the target of class y
        self.register_buffer("sums", torch.zeros(c, c))  # A: summed softmax of correct samples, per class
        self.register_buffer("counts", torch.zeros(c))  # n: number of correct samples, per class

    def forward(self, model, batch, step) -> dict[str, Tensor]:
        z = model(batch.x)
        a = self.cfg.alpha
        losses = {"ce": (1 - a) * ce(z, batch.y), "soft": a * soft_ce(self.soft_labels[batch.y], z)}
        self.accumulate(z.detach(), batch.y)
        return losses

    @torch.no_grad()
    def accumulate(self, logits: Tensor, y: Tensor) -> None:
        """Add the softmax of correctly classified samples to their class's running sum. Every sample is added,
        the others as zeros: no boolean-mask indexing (which waits for the device), the same sums bit for bit
        (index_add_ accumulates in index order and x + 0.0 == x)."""
        probs = F.softmax(logits.float(), dim=1)
        correct = probs.argmax(1) == y
        self.sums.index_add_(0, y, torch.where(correct[:, None], probs, 0.0))
        self.counts.index_add_(0, y, correct.to(self.counts.dtype))

    def epoch_start(self, step) -> None:
        self.sums.zero_()
        self.counts.zero_()

    @torch.no_grad()
    def epoch_end(self, step) -> None:
        """S_c = A_c / n_c, uniform 1/C for a class without a correct sample; statistics summed over ranks."""
        dist.all_reduce_sum(self.sums)
        dist.all_reduce_sum(self.counts)
        c = self.soft_labels.shape[0]
        seen = self.counts > 0
        mean = self.sums / self.counts.clamp_min(1)[:, None]
        self.soft_labels.copy_(torch.where(seen[:, None], mean, torch.full_like(mean, 1.0 / c)))

    def log_values(self, step) -> dict[str, float]:
        """Share of classes whose soft label came from correct samples (the rest fell back to uniform)."""
        return {"ols_classes_seen": float((self.counts > 0).float().mean())}
