"""CS-KD: loss vs an independent reference, no-grad partner forward in train mode, sampler needs, config."""
import math

import pytest
import torch
from helpers import LinearProbe, make_setup, make_step, pair_batch, ref_ce, ref_kl, toy_data
from torch import nn

from ipsd.config import ConfigError
from ipsd.data.loader import DeviceLoader
from ipsd.resolve import load_methods

CSKD = load_methods().get("cskd")
SETUP = make_setup()


def reference(z, zp, y, T, lam):
    """Spec b.5 with plain formulas: mean CE on anchors + lam T^2 sum_k q log(q/p), batch mean."""
    return ref_ce(z, y), lam * ref_kl(zp, z, T)


@pytest.mark.parametrize("T,lam", [(4.0, 1.0), (2.0, 3.0), (1.0, 0.5)])
def test_loss_equals_reference(T, lam):
    method = CSKD(CSKD.resolve_config("resnet18", {"T": T, "lambda_cls": lam}), SETUP)
    model, batch = LinearProbe(), pair_batch()
    losses = method(model, batch, make_step())
    assert set(losses) == {"ce", "kd"}
    assert torch.equal(model.inputs[0], batch.x) and torch.equal(model.inputs[1], batch.partner)
    z, zp = (o.detach().double() for o in model.outputs)
    want_ce, want_kd = reference(z, zp, batch.y, T, lam)
    assert want_kd > 1e-3
    assert math.isclose(losses["ce"].item(), want_ce.item(), rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), want_kd.item(), rel_tol=1e-4)


def test_partner_output_has_no_gradient_and_the_weight_gradient_treats_it_as_a_constant():
    method = CSKD(CSKD.resolve_config("resnet18", {}), SETUP)
    model, batch = LinearProbe(), pair_batch()
    sum(method(model, batch, make_step()).values()).backward()
    z, zp = model.outputs
    assert z.grad_fn is not None and z.grad.abs().sum() > 0
    assert zp.grad_fn is None and not zp.requires_grad
    # the same loss with the partner logits as a constant gives the same parameter gradient
    ref_model = LinearProbe()
    za = batch.x.flatten(1) @ ref_model.w
    const = (batch.partner.flatten(1) @ ref_model.w).detach()
    sum(reference(za, const, batch.y, 4.0, 1.0)).backward()
    torch.testing.assert_close(model.w.grad, ref_model.w.grad)


class BNNet(nn.Module):
    """Records, per call, whether grad was enabled, the train flag and the BN running mean afterwards."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 5)
        self.calls = []

    def forward(self, x, features=False):
        out = self.fc(self.bn(x).mean((2, 3)))
        self.calls.append((torch.is_grad_enabled(), self.training, self.bn.running_mean.clone()))
        return out


def test_partner_forward_runs_in_train_mode_without_grad_and_updates_bn_statistics():
    method = CSKD(CSKD.resolve_config("resnet18", {}), SETUP)
    net, batch = BNNet(), pair_batch()
    batch.partner = batch.partner + 5.0  # a different mean, so the partner forward visibly moves the stats
    method(net, batch, make_step())
    (grad_a, train_a, mean_a), (grad_p, train_p, mean_p) = net.calls
    assert grad_a and train_a
    assert not grad_p and train_p
    assert not torch.allclose(mean_a, mean_p)  # the partner forward updated the running mean
    assert torch.equal(net.bn.running_mean, mean_p)


def test_needs_pairs_with_self_pairs_by_default_and_the_option_excludes_them():
    assert CSKD(CSKD.resolve_config("resnet18", {}), SETUP).needs.self_pairs is True
    method = CSKD(CSKD.resolve_config("resnet18", {"self_pairs": False}), SETUP)
    assert method.needs.pairs and not method.needs.self_pairs
    loader = DeviceLoader(toy_data(n_per_class=3), torch.device("cpu"), 6, method.needs, seed=0)
    for batch in loader.epoch(1):
        assert torch.equal(loader.train_y[batch.partner_index], batch.y)
        assert (batch.partner_index != batch.index).all()


def test_config_defaults_and_refusals():
    cfg = CSKD.resolve_config("resnet18", {})
    assert (cfg.T, cfg.lambda_cls, cfg.self_pairs) == (4.0, 1.0, True)
    assert CSKD.resolve_config("vgg16", {"lambda_cls": 3}).lambda_cls == 3.0
    with pytest.raises(ConfigError, match="T=0"):
        CSKD.resolve_config("resnet18", {"T": 0})
    with pytest.raises(ConfigError, match="lambda_cls=-1"):
        CSKD.resolve_config("resnet18", {"lambda_cls": -1})
    with pytest.raises(ConfigError, match="did you mean 'lambda_cls'"):
        CSKD.resolve_config("resnet18", {"lambda_clss": 1})
    with pytest.raises(ConfigError, match="self_pairs must be true or false"):
        CSKD.resolve_config("resnet18", {"self_pairs": 1})
