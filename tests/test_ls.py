"""Label smoothing against a plain-formula reference, its gradient, both target forms, config refusal."""
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import LinearProbe, make_setup, make_step, ref_log_softmax

from ipsd.config import ConfigError
from ipsd.method import Batch
from ipsd.resolve import load_methods

LS = load_methods().get("ls")
C = 5
SETUP = make_setup(classes=C)


def probe():
    return LinearProbe(classes=C, always_grad=True)


def make_batch(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(x=torch.randn(b, 3, 32, 32, generator=g), y=torch.tensor([0, 1, 2, 3, 4, 2][:b]), index=torch.arange(b))


def reference_targets(y, eps, form):
    """Smoothed targets written element by element from spec b.1."""
    t = torch.zeros(len(y), C, dtype=torch.float64)
    for i, yi in enumerate(y.tolist()):
        for k in range(C):
            if form == "uniform":
                t[i, k] = (1 - eps) * (k == yi) + eps / C
            else:
                t[i, k] = 1 - eps if k == yi else eps / (C - 1)
    return t


@pytest.mark.parametrize("form", ["uniform", "others"])
@pytest.mark.parametrize("eps", [0.1, 0.3, 0.0])
def test_loss_equals_reference(form, eps):
    method = LS(LS.resolve_config("resnet18", {"eps": eps, "form": form}), SETUP)
    model, batch = probe(), make_batch()
    losses = method(model, batch, make_step())
    assert list(losses) == ["ce"]
    z = model.outputs[0].detach().double()
    t = reference_targets(batch.y, eps, form)
    assert torch.allclose(t.sum(1), torch.ones(len(t), dtype=torch.float64))
    ref = -(t * ref_log_softmax(z)).sum(1).mean()
    assert math.isclose(losses["ce"].item(), ref.item(), rel_tol=1e-5)


def test_standard_form_is_torch_label_smoothing_and_forms_differ():
    model, batch = probe(), make_batch()
    uni = LS(LS.resolve_config("resnet18", {}), SETUP)(model, batch, make_step())["ce"]
    z = model.outputs[0].detach()
    torch.testing.assert_close(uni, F.cross_entropy(z, batch.y, label_smoothing=0.1))
    oth = LS(LS.resolve_config("resnet18", {"form": "others"}), SETUP)(model, batch, make_step())["ce"]
    assert not torch.isclose(uni, oth)


@pytest.mark.parametrize("form", ["uniform", "others"])
def test_gradient_is_softmax_minus_smoothed_target(form):
    method = LS(LS.resolve_config("resnet18", {"form": form}), SETUP)
    model, batch = probe(), make_batch()
    method(model, batch, make_step())["ce"].backward()
    z = model.outputs[0]
    expected = (torch.softmax(z.detach().double(), 1) - reference_targets(batch.y, 0.1, form)) / len(batch.y)
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-4, atol=1e-7)
    assert model.w.grad is not None and model.w.grad.abs().sum() > 0


def test_defaults_and_refusals():
    cfg = LS.resolve_config("resnet18", {})
    assert (cfg.eps, cfg.form) == (0.1, "uniform")
    assert LS.resolve_config("shufflenetv2", {}) == cfg  # no per-model settings
    with pytest.raises(ConfigError, match=r"eps=1.5 .*\[0, 1\]"):
        LS.resolve_config("resnet18", {"eps": 1.5})
    with pytest.raises(ConfigError, match="form"):
        LS.resolve_config("resnet18", {"form": "c-1"})
    with pytest.raises(ConfigError, match="did you mean 'eps'"):
        LS.resolve_config("resnet18", {"epsilon": 0.2})
    assert LS(cfg, SETUP).state_dict() == {}
