"""Hard Label on two views: the compute-matched control for the methods that see two images per anchor.

IPS, CS-KD, DDGSD and DLB forward two images per anchor; Hard Label forwards one. This control trains plain
cross-entropy on two independently augmented views of each anchor, 0.5 * (CE(x1) + CE(x2)), at the same batch
size, so it sees the same images per step and takes the same steps as IPS: a gain of a two-image method over
this row is not explained by seeing more augmented images. The views go through the model in two calls, as
IPS's swapped pair does (BatchNorm statistics per view). Not a method of the paper.
"""
from __future__ import annotations

from dataclasses import dataclass

from ipsd.config import param
from ipsd.losses import ce
from ipsd.method import Method, Needs, forward_views, register_method


@dataclass
class Hard2ViewConfig:
    forward: str = param("separate", choices=("separate", "joint"),
                         doc="two model calls (BN statistics per view, like IPS) or one concatenated call")


@register_method("hard_2view")
class HardTwoViews(Method):
    Config = Hard2ViewConfig

    @classmethod
    def needs_for(cls, cfg: Hard2ViewConfig) -> Needs:
        return Needs(views=2)

    @classmethod
    def train_views(cls, cfg: Hard2ViewConfig) -> int:
        return 2

    def forward(self, model, batch, step):
        z1, z2 = forward_views(model, batch.x, batch.view2, joint=self.cfg.forward == "joint")
        return {"ce": 0.5 * (ce(z1, batch.y) + ce(z2, batch.y))}
