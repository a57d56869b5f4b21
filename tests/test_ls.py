"""Label smoothing against a plain-formula reference, its gradient, both target forms, config refusal."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ipsd.config import ConfigError
from ipsd.method import Batch, Setup, Step, load_methods

LS = load_methods().get("ls")
C = 5
SETUP = Setup("resnet18", num_classes=C, image_size=32, train_size=100, epochs=240, batch_size=4)


class LinearProbe(nn.Module):
    """Fixed linear map images -> logits that keeps its outputs for gradient checks."""

    def __init__(self, classes=C, seed=0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3 * 32 * 32, classes, generator=torch.Generator().manual_seed(seed)) * 0.05)
        self.outputs = []

    def forward(self, x, features=False):
        z = x.flatten(1) @ self.w
        z.retain_grad()
        self.outputs.append(z)
        return z


def make_batch(b=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(x=torch.randn(b, 3, 32, 32, generator=g), y=torch.tensor([0, 1, 2, 3, 4, 2][:b]), index=torch.arange(b))


def step():
    return Step(1, 240, torch.Generator().manual_seed(0))


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


def log_softmax(z):
    return z - torch.log(torch.exp(z).sum(1, keepdim=True))


@pytest.mark.parametrize("form", ["uniform", "others"])
@pytest.mark.parametrize("eps", [0.1, 0.3, 0.0])
def test_loss_equals_reference(form, eps):
    method = LS(LS.resolve_config("resnet18", {"eps": eps, "form": form}), SETUP)
    model, batch = LinearProbe(), make_batch()
    losses = method(model, batch, step())
    assert list(losses) == ["ce"]
    z = model.outputs[0].detach().double()
    t = reference_targets(batch.y, eps, form)
    assert torch.allclose(t.sum(1), torch.ones(len(t), dtype=torch.float64))
    ref = -(t * log_softmax(z)).sum(1).mean()
    assert math.isclose(losses["ce"].item(), ref.item(), rel_tol=1e-5)


def test_standard_form_is_torch_label_smoothing_and_forms_differ():
    model, batch = LinearProbe(), make_batch()
    uni = LS(LS.resolve_config("resnet18", {}), SETUP)(model, batch, step())["ce"]
    z = model.outputs[0].detach()
    torch.testing.assert_close(uni, F.cross_entropy(z, batch.y, label_smoothing=0.1))
    oth = LS(LS.resolve_config("resnet18", {"form": "others"}), SETUP)(model, batch, step())["ce"]
    assert not torch.isclose(uni, oth)


@pytest.mark.parametrize("form", ["uniform", "others"])
def test_gradient_is_softmax_minus_smoothed_target(form):
    method = LS(LS.resolve_config("resnet18", {"form": form}), SETUP)
    model, batch = LinearProbe(), make_batch()
    method(model, batch, step())["ce"].backward()
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
