"""DDGSD: loss vs an independent reference, stop-gradient on each KL target, one joint forward, config."""
import math

import pytest
import torch
from helpers import make_setup, make_step, ref_ce, ref_kl
from torch import nn

from ipsd.config import ConfigError
from ipsd.method import Batch
from ipsd.resolve import load_methods
from ipsd.models.base import Features

DDGSD = load_methods().get("ddgsd")
SETUP = make_setup()


class FeatureProbe(nn.Module):
    """Two linear maps (image -> 6-d embedding -> logits) returning ``Features`` like the zoo models."""

    def __init__(self, classes=5, dim=6):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(3 * 32 * 32, dim, generator=g) * 0.05)
        self.w2 = nn.Parameter(torch.randn(dim, classes, generator=g))
        self.inputs, self.outputs, self.pooled = [], [], []

    def forward(self, x, features=False):
        self.inputs.append(x)
        h = x.flatten(1) @ self.w1
        z = h @ self.w2
        z.retain_grad()
        self.outputs.append(z)
        self.pooled.append(h)
        feats = Features(stem=h, stages=[h], pre_pool=h[:, :, None, None], pooled=h)
        return (z, feats) if features else z


def make_batch(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 32, 32, generator=g)
    return Batch(x=x, y=torch.tensor([0, 1, 2, 3])[:b], index=torch.arange(b),
                 view2=x.flip(3) + 0.3 * torch.randn(b, 3, 32, 32, generator=g))


def reference(z1, z2, h1, h2, y, T, lam, ce_weight):
    """Spec b.3 with plain formulas."""
    return (ce_weight * 0.5 * (ref_ce(z1, y) + ref_ce(z2, y)), ref_kl(z2, z1, T) + ref_kl(z1, z2, T),
            lam * (h1.mean() - h2.mean()) ** 2)


@pytest.mark.parametrize("T,lam,ce_weight,forward", [(4.0, 5e-4, 1.0, "joint"), (2.0, 0.3, 0.5, "joint"),
                                                    (3.0, 1.0, 1.0, "separate")])
def test_loss_equals_reference(T, lam, ce_weight, forward):
    args = {"T": T, "lambda_mmd": lam, "ce_weight": ce_weight, "forward": forward}
    method = DDGSD(DDGSD.resolve_config("resnet18", args), SETUP)
    model, batch = FeatureProbe(), make_batch()
    losses = method(model, batch, make_step())
    assert set(losses) == {"ce", "kd", "mmd"}
    if forward == "joint":  # one call on the concatenation [view 1; view 2]
        assert len(model.inputs) == 1 and torch.equal(model.inputs[0], torch.cat([batch.x, batch.view2]))
        z1, z2 = model.outputs[0].detach().double().chunk(2)
        h1, h2 = model.pooled[0].detach().double().chunk(2)
    else:
        assert len(model.inputs) == 2 and torch.equal(model.inputs[1], batch.view2)
        z1, z2 = (o.detach().double() for o in model.outputs)
        h1, h2 = (h.detach().double() for h in model.pooled)
    ref = reference(z1, z2, h1, h2, batch.y, T, lam, ce_weight)
    assert ref[1] > 1e-3 and ref[2] > 0
    for name, r in zip(("ce", "kd", "mmd"), ref):
        assert math.isclose(losses[name].item(), r.item(), rel_tol=1e-4), name


def test_each_kl_target_is_detached():
    """d kd / d z1 must be T (softmax(z1/T) - softmax(z2/T)) / B: only the KL where z1 is the student."""
    T = 4.0
    method = DDGSD(DDGSD.resolve_config("resnet18", {"T": T, "ce_weight": 0.0, "lambda_mmd": 0.0}), SETUP)
    model, batch = FeatureProbe(), make_batch()
    sum(method(model, batch, make_step()).values()).backward()
    z = model.outputs[0]
    z1, z2 = z.detach().chunk(2)
    p1, p2 = torch.softmax(z1 / T, 1), torch.softmax(z2 / T, 1)
    g1, g2 = z.grad.chunk(2)
    torch.testing.assert_close(g1, T * (p1 - p2) / len(z1))
    torch.testing.assert_close(g2, T * (p2 - p1) / len(z1))


def test_mmd_gradient_reaches_both_views_features():
    method = DDGSD(DDGSD.resolve_config("resnet18", {"ce_weight": 0.0, "lambda_mmd": 1.0, "T": 1e6}), SETUP)
    model, batch = FeatureProbe(), make_batch()
    losses = method(model, batch, make_step())
    h = model.pooled[0]
    (grad,) = torch.autograd.grad(losses["mmd"], h)
    g1, g2 = grad.chunk(2)
    d = (h[:4].mean() - h[4:].mean()).detach()
    torch.testing.assert_close(g1, torch.full_like(g1, 2 * d / g1.numel()))
    torch.testing.assert_close(g2, torch.full_like(g2, -2 * d / g2.numel()))


def test_needs_two_views_and_config():
    method = DDGSD(DDGSD.resolve_config("resnet18", {}), SETUP)
    assert method.needs.views == 2 and not method.needs.pairs
    cfg = DDGSD.resolve_config("resnet18", {})
    assert (cfg.T, cfg.lambda_mmd, cfg.ce_weight, cfg.forward) == (4.0, 5e-4, 1.0, "joint")
    with pytest.raises(ConfigError, match="forward='both'"):
        DDGSD.resolve_config("resnet18", {"forward": "both"})
    with pytest.raises(ConfigError, match="T=-1"):
        DDGSD.resolve_config("resnet18", {"T": -1})
    with pytest.raises(ConfigError, match="lambda_mmd=-0.1"):
        DDGSD.resolve_config("resnet18", {"lambda_mmd": -0.1})
