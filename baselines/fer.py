"""FER: Reducing Flipping Errors (Deng et al., AAAI 2022; `Xiang-Deng-DL/FER`).

Every training sample i keeps a soft-label memory M_i (N x C, zeros) and a sticky flag c_i
("ever classified correctly"), addressed by its dataset index (``batch.index``). Epochs
e <= e_init train with plain CE. Afterwards, with M and c read *before* this step's update,

    L = 1/B [ sum_{c_i=1} (w_ce(e) CE_i + w_kd(e) T^2 H(M_i, softmax(z_i/T))) + sum_{c_i=0} CE_i ],
    w_ce(e) = gamma + (1 - e/E)(1 - gamma),  w_kd(e) = (e/E)(1 - gamma),

normalised by the full (per-rank) batch size B; H is the soft cross-entropy against the raw memory
row, which may sum to less than 1 early on (as in the official ``KL`` criterion). From epoch
e_init on (the last init epoch included), after the forward and without gradient, every sample
predicted correctly now gets c_i <- 1 and M_i <- (1 - w_i) M_i + w_i softmax(z_i/T) with
w_i = 1 - exp(-mu softmax(z_i)_{y_i}). E is the run's epoch count, e is 1-indexed.

Under DDP each rank sees different samples, so each step the ranks all-gather (index, new memory
row, new flag) of their batch and every rank writes all of them: M and c stay identical on all
ranks (indices of one step are disjoint across ranks; the loader gives all ranks equal batch sizes).

Hyper-parameters (official ``train.sh``): T = 5, gamma = 0.1, mu = 1.0 (ResNet18) / 0.5 (ShuffleV2).
Assumed, since ``train.sh`` does not give them: mu = 1.0 for ResNet34/50/101 and the small CIFAR
ResNets, 0.5 for ShuffleV1. VGG: the official code has no VGG and IPS Table 3 leaves the FER/VGG
cells empty; this implementation allows it with mu = 1.0, but such a run reproduces no paper number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ipsd import dist
from ipsd.config import param
from ipsd.losses import ce
from ipsd.method import Method, Setup, register_method


@dataclass
class FERConfig:
    T: float = param(5.0, lo=0, lo_open=True, doc="temperature of the memory targets and the KD term")
    gamma: float = param(0.1, lo=0, hi=1, doc="final CE weight of flagged samples (w_ce goes 1 -> gamma)")
    mu: float = param(1.0, lo=0, lo_open=True,
                      doc="memory update rate w = 1 - exp(-mu p_y); ResNet18 1.0, ShuffleV2 0.5 (official); "
                          "assumed 1.0 for other ResNets and VGG (no official VGG), 0.5 for ShuffleV1")
    e_init: int = param(1, lo=0, doc="epochs of plain CE; the memory is first updated in epoch e_init (epoch 1 if 0)")


@register_method("fer")
class FER(Method):
    Config = FERConfig
    model_defaults: ClassVar[dict[str, dict[str, Any]]] = {"shufflenetv1": {"mu": 0.5}, "shufflenetv2": {"mu": 0.5}}

    def __init__(self, cfg: FERConfig, setup: Setup):
        super().__init__(cfg, setup)
        self.register_buffer("memory", torch.zeros(setup.train_size, setup.num_classes))  # M
        self.register_buffer("flags", torch.zeros(setup.train_size, dtype=torch.bool))  # c (sticky)

    def weights(self, step) -> tuple[float, float]:
        """(w_ce, w_kd) of flagged samples at this epoch."""
        r, g = step.epoch / step.epochs, self.cfg.gamma
        return g + (1 - r) * (1 - g), r * (1 - g)

    def forward(self, model, batch, step) -> dict[str, Tensor]:
        c = self.cfg
        z = model(batch.x)
        zf = z.float()
        if step.epoch <= c.e_init:
            losses = {"ce": ce(zf, batch.y), "kd": zf.new_zeros(())}
        else:
            memory, flagged = self.memory[batch.index], self.flags[batch.index]  # before this step's update
            w_ce, w_kd = self.weights(step)
            ce_i = F.cross_entropy(zf, batch.y, reduction="none")
            h_i = -(memory * F.log_softmax(zf / c.T, dim=1)).sum(1)
            b = len(batch.y)
            losses = {
                "ce": torch.where(flagged, w_ce * ce_i, ce_i).sum() / b,
                "kd": (w_kd * c.T * c.T) * torch.where(flagged, h_i, torch.zeros_like(h_i)).sum() / b,
            }
        if step.epoch >= c.e_init:
            self.update(zf.detach(), batch.y, batch.index)
        return losses

    @torch.no_grad()
    def update(self, logits: Tensor, y: Tensor, index: Tensor) -> None:
        """Move the memory of correctly predicted samples towards softmax(z/T) and flag them, on all ranks."""
        c = self.cfg
        probs = F.softmax(logits, dim=1)
        correct = probs.argmax(1) == y
        w = (1 - torch.exp(-c.mu * probs.gather(1, y[:, None])))  # (B, 1)
        old = self.memory[index]
        rows = torch.where(correct[:, None], (1 - w) * old + w * F.softmax(logits / c.T, dim=1), old)
        flags = (self.flags[index] | correct).to(rows.dtype)
        # one gather of (rows | flag) and one of indices: every rank applies every rank's update
        packed = dist.all_gather_cat(torch.cat([rows, flags[:, None]], dim=1))
        index = dist.all_gather_cat(index)
        self.memory[index] = packed[:, :-1]
        self.flags[index] = packed[:, -1] > 0.5

    def log_values(self, step) -> dict[str, float]:
        """Share of training samples flagged (ever classified correctly)."""
        return {"fer_flagged": float(self.flags.float().mean())}
