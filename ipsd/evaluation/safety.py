"""Safety and calibration metrics from clean-test-set logits (N, C) and labels (N,).

Every metric ranks or bins by the max-softmax confidence (softmax in float64; torchmetrics computes ECE
and the ROC rates in float32). Keys and scales are those of results/paper/table10_safety_resnet50.csv:
accuracy and FPR in %, AURC and E-AURC x10^3, ECE and Brier x10^2, NLL in nats.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import binary_roc, multiclass_calibration_error

ECE_BINS = 15
TPR_LEVEL = 0.95


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 2 or labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"need logits (N, C) and labels (N,) with N > 0, got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")


def confidence_and_correct(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Max-softmax confidence (float64) and whether the argmax equals the label (bool)."""
    conf, pred = F.softmax(logits.double(), dim=1).max(dim=1)
    return conf, pred == labels


def aurc(conf: Tensor, correct: Tensor) -> float:
    """Area under the risk-coverage curve: mean over k = 1..N of the error rate among the k most confident.

    Samples with equal confidence form one group; inside it the cumulative error count is interpolated
    linearly (the expectation over all orders of the group), so the value does not depend on input order.
    Without ties this is the plain sort-and-accumulate sum.
    """
    conf, err = conf.double().flatten(), (~correct.bool()).double().flatten()
    n = conf.numel()
    order = torch.argsort(conf, descending=True, stable=True)
    conf, err = conf[order], err[order]
    # group boundaries: last index of each run of equal confidences
    last = torch.cat([torch.nonzero(conf[1:] != conf[:-1]).flatten(), torch.tensor([n - 1])])
    first = torch.cat([torch.tensor([0]), last[:-1] + 1])
    cum = torch.cumsum(err, 0)
    errs_before = torch.where(first > 0, cum[(first - 1).clamp(min=0)], torch.zeros_like(first, dtype=cum.dtype))
    group_rate = (cum[last] - errs_before) / (last - first + 1).double()
    group = torch.repeat_interleave(torch.arange(len(last)), last - first + 1)
    k = torch.arange(1, n + 1, dtype=torch.float64)
    expected_errs = errs_before[group] + (k - first[group].double()) * group_rate[group]
    return float((expected_errs / k).mean())


def oracle_aurc(error_rate: float) -> float:
    """AURC of a perfect ranking, continuous form: r + (1 - r) ln(1 - r) for error rate r (0 at r = 0, 1 at r = 1).

    The discrete oracle over N samples (errors ranked last) is a right Riemann sum of the same increasing
    integrand, so it is never below this value and tends to it as N grows.
    """
    r = float(error_rate)
    if not 0.0 <= r <= 1.0:
        raise ValueError(f"error rate must lie in [0, 1], got {r}")
    return r + ((1.0 - r) * math.log1p(-r) if r < 1.0 else 0.0)


def fpr_at_tpr(conf: Tensor, correct: Tensor, tpr_level: float = TPR_LEVEL) -> float:
    """Misclassification detection: the smallest false-positive rate among ROC points with TPR >= tpr_level.

    Correct predictions are the positives, the confidence the score; the ROC (torchmetrics ``binary_roc``,
    exact thresholds) is a step curve with tied scores moving together, and no interpolation is done.
    NaN when there are no correct or no wrong predictions.
    """
    pos = correct.bool().flatten()
    if pos.all() or not pos.any():
        return float("nan")
    fpr, tpr, _ = binary_roc(conf.double().flatten(), pos.long())
    return float(fpr[tpr >= tpr_level].min())


def ece(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    """Expected calibration error (L1) of the max-softmax confidence over ``bins`` equal-width bins
    (torchmetrics ``multiclass_calibration_error``): sum over bins of |accuracy - mean confidence| x bin share.

    torchmetrics' bins are closed on the left, [i/bins, (i+1)/bins), and a confidence of exactly 1.0 (in
    float32) forms a bin of its own.
    """
    return float(multiclass_calibration_error(probs, labels, num_classes=probs.shape[1], n_bins=bins, norm="l1"))


def brier(probs: Tensor, labels: Tensor) -> float:
    """Multiclass Brier score: mean over samples of the SUM over classes of (p_c - onehot_c)^2, in [0, 2].

    The sum (not the mean over classes) is the scale of the table10 CSV: ~0.3 for an ~80%-accurate
    CIFAR-100 model, where a mean over the 100 classes would be ~0.003.
    """
    onehot = F.one_hot(labels, probs.shape[1]).to(probs.dtype)
    return float(((probs - onehot) ** 2).sum(1).mean())


def safety_metrics(logits: Tensor, labels: Tensor, bins: int = ECE_BINS) -> dict[str, float]:
    """All Table 10 metrics for one model on the clean test set, as plain floats with the settings used.

    Keys: ``accuracy_%``, ``AURC_x1e3``, ``EAURC_x1e3`` (AURC minus the continuous oracle),
    ``FPR_x1e2`` (FPR at 95% TPR, in %), ``ECE_x1e2``, ``Brier_x1e2``, ``NLL``, and the settings
    ``ECE_bins``, ``TPR_level``, ``n``.
    """
    _check(logits, labels)
    logits, labels = logits.detach().cpu(), labels.detach().cpu().long()
    probs = F.softmax(logits.double(), dim=1)
    conf, correct = confidence_and_correct(logits, labels)
    acc = float(correct.double().mean())
    a = aurc(conf, correct)
    return {
        "accuracy_%": 100.0 * acc,
        "AURC_x1e3": 1e3 * a,
        "EAURC_x1e3": 1e3 * (a - oracle_aurc(1.0 - acc)),
        "FPR_x1e2": 100.0 * fpr_at_tpr(conf, correct),
        "ECE_x1e2": 100.0 * ece(probs, labels, bins),
        "Brier_x1e2": 100.0 * brier(probs, labels),
        "NLL": float(F.cross_entropy(logits.double(), labels)),
        "ECE_bins": float(bins),
        "TPR_level": TPR_LEVEL,
        "n": float(labels.numel()),
    }
