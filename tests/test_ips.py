"""IPS loss against an independent reference, gradient semantics, per-model defaults, BN modes."""
import math
from functools import partial

import pytest
import torch
from helpers import LinearProbe, make_setup, make_step, pair_batch, ref_ce, ref_kl
from torch import nn

from ipsd.config import ConfigError
from ipsd.method import Batch, forward_views
from ipsd.resolve import load_methods

METHODS = load_methods()
IPS = METHODS.get("ips")
SETUP = make_setup()
probe = partial(LinearProbe, scale=0.02, always_grad=True)


def reference_loss(za, zb, y, T, gamma, alpha):
    """Paper Eqs. 1-3 with plain tensor formulas: mean CE, KL(A||B) = sum A log(A/B), batchmean, T^2."""
    return 0.5 * gamma * (ref_ce(za, y) + ref_ce(zb, y)), 0.5 * alpha * (ref_kl(za, zb, T) + ref_kl(zb, za, T))


def step(epoch=200, seed=0):
    return make_step(epoch, seed=seed)


@pytest.mark.parametrize("T,gamma,alpha", [(4.0, 1.0, 1.0), (2.0, 0.5, 0.5), (1.0, 0.3, 2.0)])
def test_loss_equals_reference_without_swap(T, gamma, alpha):
    method = IPS(IPS.resolve_config("resnet18", {"T": T, "gamma": gamma, "alpha": alpha, "pr_schedule": "constant",
                                                 "p_r": 0.0}), SETUP)
    model, batch = probe(), pair_batch()
    losses = method(model, batch, step())
    za, zb = [z.detach().double() for z in model.outputs]
    want_ce, want_kd = reference_loss(za, zb, batch.y, T, gamma, alpha)
    assert torch.equal(model.inputs[0], batch.x) and torch.equal(model.inputs[1], batch.partner)
    assert math.isclose(losses["ce"].item(), want_ce.item(), rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), want_kd.item(), rel_tol=1e-4, abs_tol=1e-7)
    assert want_kd > 0


def test_swapped_views_reach_the_model():
    method = IPS(IPS.resolve_config("resnet18", {"pr_schedule": "constant", "p_r": 1.0}), SETUP)
    model, batch = probe(), pair_batch()
    method(model, batch, step())
    xa, xb = model.inputs
    torch.testing.assert_close(xa + xb, batch.x + batch.partner)
    assert not torch.equal(xa, batch.x) and not torch.equal(xb, batch.partner)


def test_gradients_flow_into_both_views_symmetrically():
    args = {"gamma": 0.0, "pr_schedule": "constant", "p_r": 0.0}  # KD term only, no swap
    method = IPS(IPS.resolve_config("resnet18", args), SETUP)
    batch = pair_batch()
    flipped = Batch(x=batch.partner, y=batch.y, index=batch.index, partner=batch.x, partner_index=batch.index)
    grads = []
    for b in (batch, flipped):
        model = probe()
        sum(method(model, b, step()).values()).backward()
        grads.append([z.grad for z in model.outputs])
    (ga, gb), (ga_flip, gb_flip) = grads
    assert ga.abs().sum() > 0 and gb.abs().sum() > 0  # no stop-gradient on either side
    torch.testing.assert_close(ga, gb_flip)  # the loss is symmetric in the two views
    torch.testing.assert_close(gb, ga_flip)


def test_detach_target_ablation_changes_gradients():
    model1, model2, batch = probe(), probe(), pair_batch()
    full = IPS(IPS.resolve_config("resnet18", {"gamma": 0.0}), SETUP)
    det = IPS(IPS.resolve_config("resnet18", {"gamma": 0.0, "detach_target": True}), SETUP)
    sum(full(model1, batch, step()).values()).backward()
    sum(det(model2, batch, step()).values()).backward()
    # stopping the target side halves nothing in general: gradients must differ
    assert not torch.allclose(model1.outputs[0].grad, model2.outputs[0].grad)


def test_per_model_defaults_and_user_override():
    assert (IPS.resolve_config("resnet18", {}).gamma, IPS.resolve_config("resnet18", {}).alpha) == (1.0, 1.0)
    for m in ("resnet34", "resnet50", "resnet101", "vgg16"):
        cfg = IPS.resolve_config(m, {})
        assert (cfg.gamma, cfg.alpha) == (0.5, 0.5)
    assert IPS.resolve_config("vgg16", {"gamma": 1.0}).gamma == 1.0
    cfg = IPS.resolve_config("resnet18", {})
    assert (cfg.T, cfg.grid, cfg.pr_schedule, cfg.k_mode, cfg.forward) == (4.0, 4, "incremental", "uniform", "separate")


def test_bad_hyper_parameters_are_refused():
    with pytest.raises(ConfigError, match=r"p_r=1.5 .*\[0, 1\]"):
        IPS.resolve_config("resnet18", {"p_r": 1.5})
    with pytest.raises(ConfigError, match="grid=5 must divide the image size 32"):
        IPS(IPS.resolve_config("resnet18", {"grid": 5}), SETUP)
    with pytest.raises(ConfigError, match="did you mean 'grid'"):
        IPS.resolve_config("resnet18", {"grdi": 2})
    with pytest.raises(ConfigError, match="pr_schedule"):
        IPS.resolve_config("resnet18", {"pr_schedule": "linear"})


def test_swap_probability_follows_the_schedule():
    method = IPS(IPS.resolve_config("resnet18", {}), SETUP)
    assert [method.log_values(step(e))["p_r"] for e in (1, 31, 81, 121)] == [0.1, 0.2, 0.3, 0.5]


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x, features=False):
        return self.bn(x).mean((2, 3))


def test_joint_forward_shares_bn_statistics_separate_does_not():
    net = BNNet()
    a, b = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8) + 3
    sep = forward_views(net, a, b)
    joint = forward_views(net, a, b, joint=True)
    assert not torch.allclose(sep[1], joint[1], atol=1e-3)
    torch.testing.assert_close(sep[0], net.bn(a).mean((2, 3)))
    net.eval()
    sep, joint = forward_views(net, a, b), forward_views(net, a, b, joint=True)
    torch.testing.assert_close(sep[0], joint[0])
    torch.testing.assert_close(sep[1], joint[1])
