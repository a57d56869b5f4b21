"""+Swap (IPS paper, Table 10): cross-entropy on the first swapped input only, no distillation.

Batches hold same-class pairs as IPS's do, and the pair goes through IPS's own patch swap (``ipsd.patch_swap``, the
same draws from ``step.generator``) under IPS's p_r schedule; only the first output of the swap (the anchor with
the partner's cells) is forwarded: loss = CE(f(x_a'), y). The partner is a swap source only (B images forwarded of
the 2B loaded). The settings are IPS's swap fields with IPS's defaults (4x4 grid, incremental p_r); IPS's loss
weights and temperature do not apply.
"""
from __future__ import annotations

import dataclasses

from baselines.ips import IPS, IPSConfig
from ipsd.losses import ce
from ipsd.method import register_method
from ipsd.patch_swap import patch_swap

SWAP_FIELDS = ("grid", "p_r", "pr_schedule", "k_mode", "self_pairs")
# IPS's swap fields (same names, defaults, ranges and docs), without its loss weights, temperature or forward mode
SwapConfig = dataclasses.make_dataclass(
    "SwapConfig", [(f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata))
                   for f in dataclasses.fields(IPSConfig) if f.name in SWAP_FIELDS])
SwapConfig.__module__ = __name__


@register_method("swap")
class Swap(IPS):
    Config = SwapConfig
    model_defaults = {}  # IPS's per-model gamma/alpha: this method has no loss weights

    @classmethod
    def train_views(cls, cfg) -> int:
        return 1

    @classmethod
    def predicted_cost(cls, cfg) -> str:
        return "B fwd+bwd (+ B partners loaded as swap sources, not forwarded)"

    def forward(self, model, batch, step):
        c = self.cfg
        xa, _ = patch_swap(batch.x, batch.partner, c.grid, self.swap_probability(step), step.generator, c.k_mode)
        return {"ce": ce(model(xa), batch.y)}
