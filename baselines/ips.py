"""IPS: Intra-class Patch Swap self-distillation (Choi et al., arXiv 2505.14124).

Each anchor is paired with another image of its class; with probability p_r the pair exchanges a
random set of grid cells. Both views are trained with CE and distil into each other through a
symmetric KL at temperature T, with gradients through both sides (no teacher, no stop-gradient).
"""
from __future__ import annotations

from dataclasses import dataclass

from ipsd.config import ConfigError, param
from ipsd.losses import ce, kl_t2, symmetric_kl_t2
from ipsd.method import Method, Needs, Setup, forward_views, register_method
from ipsd.patch_swap import patch_swap
from ipsd.schedules import swap_probability


@dataclass
class IPSConfig:
    T: float = param(4.0, lo=0, lo_open=True, doc="KD temperature (paper: 4 is best)")
    gamma: float = param(1.0, lo=0, doc="CE weight (0.5 for ResNet34/50/101 and VGG16)")
    alpha: float = param(1.0, lo=0, doc="KD weight (0.5 for ResNet34/50/101 and VGG16)")
    grid: int = param(4, lo=2, doc="n of the n x n patch grid (4x4 on CIFAR = 16 cells of 8 px); at least 2, so a swap "
                                   "exchanges between 1 and n^2 - 1 cells")
    p_r: float = param(0.5, lo=0, hi=1, doc="swap probability of the constant schedule")
    pr_schedule: str = param("incremental", choices=("incremental", "constant"),
                             doc="incremental = 0.1/0.2/0.3/0.5 after epochs 30/80/120 of 240 (Tables 3/4/15)")
    k_mode: str = param("uniform", choices=("uniform", "single"),
                        doc="cells swapped: U{1..n^2-1} (the paper's prose) or exactly 1 (its snippet, read literally)")
    forward: str = param("separate", choices=("separate", "joint"),
                         doc="two model calls (BN statistics per view, Algorithm 1) or one concatenated call")
    self_pairs: bool = param(False, doc="allow an anchor to be paired with itself")
    detach_target: bool = param(False, doc="ablation: stop the gradient of the target side of each KL")


@register_method("ips")
class IPS(Method):
    Config = IPSConfig
    model_defaults = {m: {"gamma": 0.5, "alpha": 0.5} for m in ("resnet34", "resnet50", "resnet101", "vgg16")}

    @classmethod
    def needs_for(cls, cfg: IPSConfig) -> Needs:
        return Needs(pairs=True, self_pairs=cfg.self_pairs)

    @classmethod
    def train_views(cls, cfg: IPSConfig) -> int:
        return 2

    def __init__(self, cfg: IPSConfig, setup: Setup):
        super().__init__(cfg, setup)
        if setup.image_size % cfg.grid:
            raise ConfigError(f"method_args.grid={cfg.grid} must divide the image size {setup.image_size}")

    def swap_probability(self, step) -> float:
        return swap_probability(self.cfg.pr_schedule, step.epoch, step.epochs, self.cfg.p_r, step.schedule_ref_epochs)

    def forward(self, model, batch, step):
        c = self.cfg
        xa, xb = patch_swap(batch.x, batch.partner, c.grid, self.swap_probability(step), step.generator, c.k_mode)
        za, zb = forward_views(model, xa, xb, joint=c.forward == "joint")
        return {"ce": 0.5 * c.gamma * (ce(za, batch.y) + ce(zb, batch.y)), "kd": self.distill(za, zb)}

    def distill(self, za, zb):
        """The KD term between the two views' logits: 0.5 * alpha * (KL(a||b) + KL(b||a)) at T, each target side
        detached when ``detach_target``."""
        c = self.cfg
        if c.detach_target:
            kd = kl_t2(za.detach(), zb, c.T) + kl_t2(zb.detach(), za, c.T)
        else:
            kd = symmetric_kl_t2(za, zb, c.T)
        return 0.5 * c.alpha * kd

    def log_values(self, step):
        return {"p_r": self.swap_probability(step)}
