"""Untargeted white-box FGSM and I-FGSM in [0, 1] pixel space.

The attacked function is ``model(normalise(x))``: the per-channel normalisation sits inside it, so
gradients, the eps-ball and the [0, 1] box are all in raw pixel units (eps = 0.01 is 2.55/255).
Adversarial images stay float; they are not re-quantised to uint8.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

EPS_LIST = (0.0, 0.001, 0.003, 0.005, 0.01, 0.05)
METHODS = ("fgsm", "ifgsm")


def to_unit(x: Tensor) -> Tensor:
    """uint8 images as float32 in [0, 1] (divided by 255); float images are checked to lie in [0, 1]."""
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [0, 1], got {x.dtype}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError("float images must lie in [0, 1]")
    return x.float()


def normalise(x01: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel of (N, C, H, W) images."""
    m = torch.as_tensor(mean, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x01.dtype, device=x01.device).view(1, -1, 1, 1)
    return (x01 - m) / s


def _loss_grad_sign(model: nn.Module, x01: Tensor, y: Tensor, mean, std) -> Tensor:
    """sign of d CE / d x at x01. The loss is summed over the batch: the sign equals the mean's, without
    the 1/B that can underflow per-pixel gradients to zero."""
    with torch.enable_grad():
        x = x01.detach().requires_grad_(True)
        loss = F.cross_entropy(model(normalise(x, mean, std)).float(), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, x)
    return grad.sign()


def fgsm(model: nn.Module, x01: Tensor, y: Tensor, eps: float, mean, std) -> Tensor:
    """x' = clip(x + eps * sign(grad_x CE), 0, 1); x itself when eps = 0 (no gradient is taken)."""
    if eps == 0:
        return x01.clone()
    return (x01 + eps * _loss_grad_sign(model, x01, y, mean, std)).clamp(0.0, 1.0).detach()


def ifgsm(model: nn.Module, x01: Tensor, y: Tensor, eps: float, mean, std, steps: int = 10,
          step_size: float | None = None) -> Tensor:
    """``steps`` signed-gradient steps of ``step_size`` (default eps / steps) from x, each followed by
    projection onto the L-inf eps-ball around x and onto [0, 1]; x itself when eps = 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eps == 0:
        return x01.clone()
    alpha = eps / steps if step_size is None else float(step_size)
    lo, hi = (x01 - eps).clamp(min=0.0), (x01 + eps).clamp(max=1.0)
    adv = x01.clone()
    for _ in range(steps):
        adv = adv + alpha * _loss_grad_sign(model, adv, y, mean, std)
        adv = torch.max(torch.min(adv, hi), lo).detach()
    return adv


@torch.no_grad()
def _correct(model: nn.Module, x01: Tensor, y: Tensor, mean, std) -> int:
    return int((model(normalise(x01, mean, std)).argmax(1) == y).sum())


def attack_accuracy(model: nn.Module, x: Tensor, y: Tensor, mean: Sequence[float], std: Sequence[float],
                    eps_list: Sequence[float] = EPS_LIST, method: str = "fgsm", steps: int = 10,
                    step_size: float | None = None, batch_size: int = 500) -> dict:
    """Top-1 accuracy (%) under an untargeted white-box attack, for each eps in ``eps_list``.

    ``x`` is uint8 or float in [0, 1], (N, C, H, W); batches are moved to the model's device. The model is
    attacked in eval mode and its train/eval mode is restored afterwards. eps = 0 is the clean accuracy
    (no perturbation, whatever ``steps``). Returns ``{"method", "steps", "step_size", "eps",
    "accuracy_%": {eps: acc}, "n"}``; ``step_size`` is the rule (``"eps"`` for FGSM, ``"eps/steps"``
    or the fixed value for I-FGSM).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"need N > 0 images and N labels, got {x.shape[0]} and {y.shape[0]}")
    eps_values = list(dict.fromkeys(float(e) for e in eps_list))
    if any(e < 0 for e in eps_values):
        raise ValueError(f"eps must be >= 0, got {eps_values}")
    device = next(model.parameters()).device
    correct = dict.fromkeys(eps_values, 0)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, x.shape[0], batch_size):
            xb = to_unit(x[start:start + batch_size]).to(device)
            yb = y[start:start + batch_size].to(device).long()
            for e in eps_values:
                if e == 0:
                    adv = xb
                elif method == "fgsm":
                    adv = fgsm(model, xb, yb, e, mean, std)
                else:
                    adv = ifgsm(model, xb, yb, e, mean, std, steps, step_size)
                correct[e] += _correct(model, adv, yb, mean, std)
    finally:
        model.train(was_training)
    n = int(x.shape[0])
    if method == "fgsm":
        steps_used, rule = 1, "eps"
    else:
        steps_used, rule = int(steps), ("eps/steps" if step_size is None else float(step_size))
    return {"method": method, "steps": steps_used, "step_size": rule, "eps": eps_values,
            "accuracy_%": {e: 100.0 * c / n for e, c in correct.items()}, "n": n}
