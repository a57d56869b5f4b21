"""Batched in-batch mixing augmentations: CutMix, Cutout and MixUp, shared by the plain baselines
(``baselines/cutmix.py``, ``cutout.py``, ``mixup.py``) and by IPS combined with them (``baselines/ips_mix.py``).

Each ``draw_*`` function makes one :class:`Mix` from the generator it is given (a method passes ``step.generator``;
nothing else is drawn from), entirely on the generator's device: no value is read on the host, so a training step
never waits for the GPU. ``Mix.apply`` mixes a batch of images; ``Mix.ce`` is the matching cross-entropy.

The defaults are the original papers' CIFAR settings:

* CutMix (Yun et al., ICCV 2019; official code clovaai/CutMix-PyTorch, its CIFAR-100 command ``--beta 1.0
  --cutmix_prob 0.5``): with probability 0.5 a batch is mixed; then one lambda ~ Beta(1, 1) and one box for the
  whole batch: side ``int(S * sqrt(1 - lambda))`` per axis, centre uniform over the image, corners
  ``clip(centre -/+ side // 2, 0, S)``; every image takes the box from its partner ``x[perm]``, and lambda becomes the
  share of pixels it keeps, ``1 - box area / image area``.
* Cutout (DeVries & Taylor, arXiv 1708.04552; official code uoguelph-mlrg/Cutout): one square hole per image, its own
  centre uniform over the image, corners ``clip(centre -/+ size // 2, 0, S)``, side 16 px on CIFAR-10 and 8 px on
  CIFAR-100; applied after normalisation (the hole is 0, the mean pixel, as in the official transform). Labels unchanged.
* MixUp (Zhang et al., ICLR 2018; official code facebookresearch/mixup-cifar10, ``--alpha 1``): one lambda ~ Beta(1, 1)
  per batch, ``x~ = lambda x + (1 - lambda) x[perm]``.

Mixed labels enter as ``lambda CE(z, y) + (1 - lambda) CE(z, y[perm])`` (the papers' code), which equals the
cross-entropy against the soft target ``lambda onehot(y) + (1 - lambda) onehot(y[perm])``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .losses import ce

__all__ = ["KINDS", "CUTMIX_ALPHA", "CUTMIX_PROB", "CUTOUT_SIZE_CIFAR10", "CUTOUT_SIZE_CIFAR100", "MIXUP_ALPHA",
           "Mix", "beta", "box_mask", "cutmix_box", "draw", "draw_cutmix", "draw_cutout", "draw_mixup"]

KINDS = ("cutmix", "cutout", "mixup")
CUTMIX_ALPHA = 1.0  # CutMix, CIFAR-100: --beta 1.0
CUTMIX_PROB = 0.5  # CutMix, CIFAR-100: --cutmix_prob 0.5 (ImageNet: 1.0)
CUTOUT_SIZE_CIFAR10 = 16  # Cutout, CIFAR-10: --length 16
CUTOUT_SIZE_CIFAR100 = 8  # Cutout, CIFAR-100: --length 8
MIXUP_ALPHA = 1.0  # MixUp, CIFAR-10/100: alpha = 1
GAMMA_CANDIDATES = 32  # Marsaglia-Tsang proposals per Gamma draw (each accepted with probability > 0.95)


@dataclass(frozen=True)
class Mix:
    """One draw: ``lam`` (0-d tensor) the weight of each image's own label, ``perm`` the in-batch partner of each row
    (None: no partner), ``mask`` (B or 1, 1, H, W) bool, the pixels replaced (cutmix: by the partner's, cutout: by 0)."""

    kind: str
    lam: Tensor
    perm: Tensor | None = None
    mask: Tensor | None = None

    def apply(self, x: Tensor) -> Tensor:
        """The mixed batch (a new tensor; ``x`` is not modified)."""
        if self.kind == "mixup":
            lam = self.lam.to(x.dtype)
            return lam * x + (1 - lam) * x[self.perm]
        if self.kind == "cutmix":
            return torch.where(self.mask, x[self.perm], x)
        return x.masked_fill(self.mask, 0.0)

    def ce(self, logits: Tensor, y: Tensor) -> Tensor:
        """``lam CE(logits, y) + (1 - lam) CE(logits, y[perm])``; plain CE without a partner (cutout)."""
        if self.perm is None:
            return ce(logits, y)
        return self.lam * ce(logits, y) + (1 - self.lam) * ce(logits, y[self.perm])


def _gamma(alpha: float, n: int, g: torch.Generator) -> Tensor:
    """``n`` Gamma(alpha, 1) samples on ``g``'s device (Marsaglia & Tsang 2000, boosted by U^(1/alpha) for alpha < 1).

    Each sample takes the first accepted of GAMMA_CANDIDATES proposals, so no loop waits on a value; all of them being
    rejected (probability below 0.05^32) falls back to the mode-like value d."""
    dev = g.device
    a = alpha + 1.0 if alpha < 1 else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / (9.0 * d) ** 0.5
    z = torch.randn(n, GAMMA_CANDIDATES, generator=g, device=dev, dtype=torch.float64)
    u = torch.rand(n, GAMMA_CANDIDATES, generator=g, device=dev, dtype=torch.float64)
    v = (1 + c * z) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * z * z + d - d * v + d * torch.log(v.clamp(min=1e-300)))
    first = ok.to(torch.int8).argmax(dim=1, keepdim=True)  # the first True (0 when none)
    x = torch.where(ok.any(dim=1), (d * v).gather(1, first).squeeze(1), torch.full((n,), d, dtype=torch.float64,
                                                                                  device=dev))
    if alpha < 1:
        x = x * torch.rand(n, generator=g, device=dev, dtype=torch.float64) ** (1.0 / alpha)
    return x


def beta(alpha: float, g: torch.Generator) -> Tensor:
    """One lambda ~ Beta(alpha, alpha) as a 0-d float32 tensor on ``g``'s device: X / (X + Y), X, Y ~ Gamma(alpha)."""
    if not alpha > 0:
        raise ValueError(f"Beta(alpha, alpha) needs alpha > 0, got {alpha}")
    x = _gamma(alpha, 2, g)
    return (x[0] / (x[0] + x[1])).float()


def cutmix_box(h: int, w: int, lam: Tensor, cy: Tensor, cx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CutMix's box for ``lam`` centred at (cy, cx): (y0, y1, x0, x1) with sides ``int(S * sqrt(1 - lam))`` and
    corners ``clip(centre -/+ side // 2, 0, S)`` (rand_bbox of the official code)."""
    cut = torch.sqrt(1 - lam.double())
    ch, cw = torch.floor(h * cut).long(), torch.floor(w * cut).long()
    return ((cy - ch // 2).clamp(0, h), (cy + ch // 2).clamp(0, h), (cx - cw // 2).clamp(0, w), (cx + cw // 2).clamp(0, w))


def box_mask(h: int, w: int, y0: Tensor, y1: Tensor, x0: Tensor, x1: Tensor) -> Tensor:
    """(N, 1, H, W) bool, True inside the half-open boxes [y0, y1) x [x0, x1); corners are (N,) or 0-d tensors."""
    dev = y0.device
    rows = torch.arange(h, device=dev).view(1, 1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, 1, w)
    y0, y1, x0, x1 = (t.reshape(-1, 1, 1, 1) for t in (y0, y1, x0, x1))
    return (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)


def _centre(size: int, n: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, size, (n,), generator=g, device=g.device)


def draw_cutmix(shape: torch.Size | tuple[int, ...], g: torch.Generator, alpha: float = CUTMIX_ALPHA,
                prob: float = CUTMIX_PROB) -> Mix:
    """CutMix for a (B, C, H, W) batch: applied with probability ``prob``, one lambda ~ Beta(alpha, alpha) and one
    box for the batch; lam is then 1 - box area / image area (1 when not applied)."""
    b, _, h, w = shape
    on = torch.rand((), generator=g, device=g.device) < prob
    lam = beta(alpha, g)
    y0, y1, x0, x1 = cutmix_box(h, w, lam, _centre(h, 1, g)[0], _centre(w, 1, g)[0])
    mask = box_mask(h, w, y0, y1, x0, x1) & on
    perm = torch.randperm(b, generator=g, device=g.device)
    kept = 1 - mask.sum(dtype=torch.float32) / (h * w)
    return Mix("cutmix", kept, perm, mask)


def draw_cutout(shape: torch.Size | tuple[int, ...], g: torch.Generator, size: int = CUTOUT_SIZE_CIFAR100) -> Mix:
    """Cutout for a (B, C, H, W) batch: one ``size`` x ``size`` hole per image, its centre uniform over the image and
    the hole clipped at the border; labels unchanged (lam = 1, no partner)."""
    b, _, h, w = shape
    cy, cx = _centre(h, b, g), _centre(w, b, g)
    mask = box_mask(h, w, (cy - size // 2).clamp(0, h), (cy + size // 2).clamp(0, h),
                    (cx - size // 2).clamp(0, w), (cx + size // 2).clamp(0, w))
    return Mix("cutout", torch.ones((), device=g.device), None, mask)


def draw_mixup(shape: torch.Size | tuple[int, ...], g: torch.Generator, alpha: float = MIXUP_ALPHA) -> Mix:
    """MixUp for a (B, C, H, W) batch: one lambda ~ Beta(alpha, alpha) and one in-batch permutation."""
    lam = beta(alpha, g)
    return Mix("mixup", lam, torch.randperm(shape[0], generator=g, device=g.device))


def draw(kind: str, shape: torch.Size | tuple[int, ...], g: torch.Generator, *, alpha: float, prob: float,
         size: int) -> Mix:
    """``draw_<kind>`` with the settings it takes (``alpha``: cutmix, mixup; ``prob``: cutmix; ``size``: cutout)."""
    if kind == "cutmix":
        return draw_cutmix(shape, g, alpha, prob)
    if kind == "cutout":
        return draw_cutout(shape, g, size)
    if kind == "mixup":
        return draw_mixup(shape, g, alpha)
    raise ValueError(f"unknown mix {kind!r}; use one of {', '.join(KINDS)}")
