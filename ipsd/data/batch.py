"""The batch contract between loaders and methods: what a method asks each batch to hold (``Needs``) and
what a loader delivers (``Batch``). It sits in the data layer, below the method contract."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Needs:
    """What the loader must put in each batch."""

    pairs: bool = False  # batch.partner: an image of the same class per anchor (IPS, CS-KD)
    self_pairs: bool = False  # whether a partner may be the anchor itself
    views: int = 1  # 2: batch.view2 is a second, independent augmentation of batch.x (DDGSD, DLB)
    strong_view2: bool = False  # view2 additionally gets RandAugment + Cutout (VRM's virtual view)
    strong_args: tuple = ()  # (key, value) pairs passed to ipsd.data.randaugment.rand_augment

    @property
    def images_per_anchor(self) -> int:
        """Images the loader delivers per anchor: 2 with a partner or a second view, else 1."""
        return 2 if (self.pairs or self.views == 2) else 1


@dataclass
class Batch:
    """One step's data on the training device; images are augmented and normalised floats."""

    x: Tensor  # (B, 3, H, W) anchors
    y: Tensor  # (B,) labels
    index: Tensor  # (B,) dataset indices of the anchors
    partner: Tensor | None = None  # (B, 3, H, W) same-class partners
    partner_index: Tensor | None = None
    view2: Tensor | None = None  # (B, 3, H, W) second view of the anchors
