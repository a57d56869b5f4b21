"""DisturbLabel: flip statistics, per-step re-draws from the step generator only, CE on disturbed labels."""
import math

import pytest
import torch
from helpers import LinearProbe, make_setup, ref_ce

from baselines.disturb import disturb_labels
from ipsd.config import ConfigError
from ipsd.method import Batch, Step
from ipsd.resolve import load_methods

DISTURB = load_methods().get("disturb")
C = 10
SETUP = make_setup(classes=C, batch_size=8)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_flip_rate_and_uniform_replacement():
    n, alpha = 200_000, 0.1
    y = torch.randint(0, C, (n,), generator=gen(123))
    d = disturb_labels(y, C, alpha, gen(0))
    rate = (d != y).float().mean().item()
    expected = alpha * (C - 1) / C
    assert abs(rate - expected) < 5 * math.sqrt(expected * (1 - expected) / n)
    # every wrong class is equally likely: P(d = k) = alpha / C for each k != y
    offset = (d - y) % C
    counts = torch.bincount(offset[offset > 0], minlength=C)[1:].float() / n
    assert torch.all((counts - alpha / C).abs() < 5 * math.sqrt(alpha / C / n))


@pytest.mark.parametrize("alpha,rate", [(0.0, 0.0), (1.0, (C - 1) / C)])
def test_extreme_alphas(alpha, rate):
    y = torch.randint(0, C, (50_000,), generator=gen(1))
    d = disturb_labels(y, C, alpha, gen(2))
    assert abs((d != y).float().mean().item() - rate) < 0.01
    assert d.min() >= 0 and d.max() < C and d.dtype == y.dtype


def test_determinism_and_generator_isolation():
    y = torch.randint(0, C, (1000,), generator=gen(1))
    before = torch.get_rng_state()
    a, b = disturb_labels(y, C, 0.5, gen(7)), disturb_labels(y, C, 0.5, gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, disturb_labels(y, C, 0.5, gen(8)))
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is never used


def test_loss_is_ce_on_disturbed_labels_redrawn_every_step():
    method = DISTURB(DISTURB.resolve_config("resnet18", {"alpha": 0.5}), SETUP)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, 32, 32, generator=gen(4))
    batch = Batch(x=x, y=torch.randint(0, C, (64,), generator=gen(5)), index=torch.arange(64))
    model = LinearProbe(classes=C, always_grad=True)
    step = Step(1, 240, g)
    l1, l2 = method(model, batch, step)["ce"], method(model, batch, step)["ce"]
    assert not torch.isclose(l1, l2)  # the same batch is disturbed afresh at the next step
    g_ref = gen(3)
    for loss, z in zip((l1, l2), model.outputs):
        yd = disturb_labels(batch.y, C, 0.5, g_ref)
        zd = z.detach().double()
        ref = ref_ce(zd, yd)
        assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    # gradient: softmax minus the one-hot of the disturbed label
    model = LinearProbe(classes=C, always_grad=True)
    method(model, batch, Step(1, 240, gen(9)))["ce"].backward()
    z = model.outputs[0]
    yd = disturb_labels(batch.y, C, 0.5, gen(9))
    expected = (torch.softmax(z.detach(), 1) - torch.eye(C)[yd]) / 64
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-7)


def test_defaults_and_refusals():
    assert DISTURB.resolve_config("resnet18", {}).alpha == 0.1
    assert DISTURB.resolve_config("vgg13", {}).alpha == 0.1
    with pytest.raises(ConfigError, match=r"alpha=-0.1 .*\[0, 1\]"):
        DISTURB.resolve_config("resnet18", {"alpha": -0.1})
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        DISTURB.resolve_config("resnet18", {"alpah": 0.2})
    assert DISTURB(DISTURB.resolve_config("resnet18", {}), SETUP).state_dict() == {}
