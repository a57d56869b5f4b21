"""Loss pieces shared by methods, written once (fp32 for numerical safety under bf16 autocast)."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor


def ce(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy."""
    return F.cross_entropy(logits.float(), y)


def soft_ce(target_probs: Tensor, logits: Tensor, T: float = 1.0) -> Tensor:
    """Batch-mean cross-entropy H(target, softmax(logits / T)); targets need not sum to 1."""
    return -(target_probs.float() * F.log_softmax(logits.float() / T, dim=1)).sum(1).mean()


def kl_t2(target_logits: Tensor, student_logits: Tensor, T: float) -> Tensor:
    """T^2 * KL(softmax(target/T) || softmax(student/T)), summed over classes, mean over the batch.

    Gradients flow into both arguments; callers detach the target where a method says so.
    """
    log_p = F.log_softmax(target_logits.float() / T, dim=1)
    log_q = F.log_softmax(student_logits.float() / T, dim=1)
    return (T * T) * F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def symmetric_kl_t2(a: Tensor, b: Tensor, T: float) -> Tensor:
    """KL(a||b) + KL(b||a) with T^2, no stop-gradient (IPS's mutual term)."""
    return kl_t2(a, b, T) + kl_t2(b, a, T)


def accuracy_counts(logits: Tensor, y: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of samples whose label is in the top-k predictions, for each k (as a float tensor)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == y[:, None]
    return torch.stack([hit[:, : min(k, kmax)].any(1).sum() for k in ks]).float()


@contextlib.contextmanager
def fp32(t: Tensor) -> Iterator[None]:
    """Autocast off for a loss block: Gram matrices, distances and norms stay in fp32 under bf16 runs."""
    with torch.autocast(t.device.type, enabled=False):
        yield


def ce_and_kd(z_s: Tensor, z_t: Tensor, y: Tensor, gamma: float, alpha: float, T: float) -> dict[str, Tensor]:
    """The teacher-based methods' shared part (RepDistiller's ``train_distill``): gamma * CE + alpha * T^2
    KL(teacher || student); ``kd`` is only returned when alpha > 0 (RepDistiller computes it at 0 too, which
    changes only the log)."""
    terms = {"ce": gamma * ce(z_s, y)}
    if alpha > 0:
        terms["kd"] = alpha * kl_t2(z_t, z_s, T)
    return terms
