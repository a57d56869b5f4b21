"""KD: Hinton et al. 2015 logit distillation from a frozen teacher (RepDistiller recipe).

    L = gamma * CE(z_s, y) + alpha * T^2 * KL_bm(softmax(z_t / T) || softmax(z_s / T))

KL summed over classes, averaged over the batch (``batchmean``). Defaults gamma 0.1, alpha 0.9, T 4
(RepDistiller ``-r 0.1 -a 0.9 -b 0 --kd_T 4``; mdistiller the same). The teacher sees the identical
augmented batch, runs in eval mode under no_grad and is a plain attribute (never a submodule), so it is
never optimised, checkpointed or touched by DDP.

Per-step cost: one teacher forward plus the student's forward and backward; the loss itself is O(B*C),
negligible.
"""
from __future__ import annotations

from dataclasses import dataclass

from ipsd.config import param
from ipsd.losses import ce_and_kd
from ipsd.method import Method, register_method

# ------------------------------------------------------------------------------------------------ KD

@dataclass
class KDConfig:
    gamma: float = param(0.1, lo=0, doc="CE weight (RepDistiller -r 0.1)")
    alpha: float = param(0.9, lo=0, doc="KD weight (RepDistiller -a 0.9)")
    T: float = param(4.0, lo=0, lo_open=True, doc="temperature on both sides (RepDistiller --kd_T 4)")


@register_method("kd")
class KD(Method):
    Config = KDConfig
    needs_teacher = True

    def forward(self, model, batch, step):
        z_s = model(batch.x)
        z_t = self.teacher(batch.x)
        c = self.cfg
        return ce_and_kd(z_s, z_t, batch.y, c.gamma, c.alpha, c.T)
