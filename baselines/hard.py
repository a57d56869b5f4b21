"""Hard Label: plain cross-entropy, the reference row of every table."""
from __future__ import annotations

from ipsd.losses import ce
from ipsd.method import Method, register_method


@register_method("hard")
class HardLabel(Method):
    def forward(self, model, batch, step):
        return {"ce": ce(model(batch.x), batch.y)}
