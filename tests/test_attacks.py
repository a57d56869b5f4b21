"""FGSM / I-FGSM: closed forms on linear models, bounds, eps = 0, mode handling, a trained CIFAR-10 model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from ipsd.evaluation.attacks import attack_accuracy, fgsm, ifgsm

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def linear(classes: int, c: int = 3, h: int = 2, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * h, classes))


def small_cnn(classes: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(32, classes))


def clean_accuracy(model: nn.Module, x01: torch.Tensor, y: torch.Tensor, mean, std) -> float:
    """Written out here, apart from the module: normalise by hand, argmax, compare."""
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        return 100.0 * float((model((x01 - m) / s).argmax(1) == y).float().mean())


def test_fgsm_on_two_class_linear_model_is_the_closed_form():
    # CE gradient wrt the normalised input is p_other * (w_other - w_y); normalisation divides by std > 0,
    # so the step is eps * sign(w_other - w_y) on every pixel (x = 0.5 keeps the clip inactive).
    model = linear(2)
    w = model[1].weight.detach()
    x = torch.full((4, 3, 2, 2), 0.5)
    y = torch.tensor([0, 1, 1, 0])
    eps = 0.01
    adv = fgsm(model, x, y, eps, MEAN, STD)
    direction = torch.sign(w[1 - y] - w[y]).view(4, 3, 2, 2)
    assert (direction != 0).all()
    torch.testing.assert_close(adv - x, eps * direction, rtol=0, atol=1e-7)


def threshold_model() -> nn.Module:
    """logits = (mean pixel - 0.5) * 100 * [1, -1] with mean 0 / std 1 normalisation: class 0 iff mean > 0.5."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.full((48,), 100 / 48), torch.full((48,), -100 / 48)]))
        model[1].bias.copy_(torch.tensor([-50.0, 50.0]))
    return model


@pytest.mark.parametrize("method", ["fgsm", "ifgsm"])
def test_accuracy_on_a_threshold_model_follows_the_margins(method):
    # constant images at v = 0.48, 0.49, 0.51, 0.52 (margins 0.02, 0.01, 0.01, 0.02 from the boundary).
    # Every pixel's gradient sign pushes towards the other class, so eps moves the mean by exactly eps
    # (I-FGSM: 10 steps of eps/10, same sign each step): a sample flips iff eps > its margin.
    v = torch.tensor([0.48, 0.49, 0.51, 0.52])
    x = v.view(4, 1, 1, 1).expand(4, 3, 4, 4).contiguous()
    y = (v < 0.5).long()  # class 0 above 0.5
    out = attack_accuracy(threshold_model(), x, y, (0.0,) * 3, (1.0,) * 3, eps_list=(0, 0.005, 0.015, 0.05),
                          method=method, batch_size=3)
    assert out["accuracy_%"] == {0.0: 100.0, 0.005: 100.0, 0.015: 50.0, 0.05: 0.0}


@pytest.mark.parametrize("method", ["fgsm", "ifgsm"])
def test_eps_zero_is_the_clean_accuracy(method):
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    model = small_cnn().eval()
    out = attack_accuracy(model, x, y, MEAN, STD, eps_list=(0,), method=method, steps=7, batch_size=16)
    assert out["accuracy_%"][0.0] == pytest.approx(clean_accuracy(model, x.float() / 255, y, MEAN, STD))


def test_ifgsm_one_step_of_eps_is_fgsm():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (8,), generator=g)
    model = small_cnn().eval()
    for eps in (0.003, 0.05):
        assert torch.equal(ifgsm(model, x, y, eps, MEAN, STD, steps=1, step_size=eps),
                           fgsm(model, x, y, eps, MEAN, STD))


def test_perturbation_stays_in_the_eps_ball_and_the_unit_box():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(16, 3, 8, 8, generator=g)
    x[0] = 0.0
    x[1] = 1.0  # saturated images: the [0, 1] clip must bind
    y = torch.randint(0, 4, (16,), generator=g)
    model = small_cnn().eval()
    eps = 0.05
    advs = [fgsm(model, x, y, eps, MEAN, STD), ifgsm(model, x, y, eps, MEAN, STD, steps=10),
            ifgsm(model, x, y, eps, MEAN, STD, steps=10, step_size=eps / 2)]  # big steps: projection binds
    for adv in advs:
        assert float((adv - x).abs().max()) <= eps + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
    assert float((advs[2] - x).abs().max()) == pytest.approx(eps, abs=1e-6)


def test_uint8_input_matches_float_input_and_settings_are_recorded():
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (12,), generator=g)
    model = small_cnn().eval()
    a = attack_accuracy(model, x, y, MEAN, STD, eps_list=(0.01,), method="ifgsm", steps=5)
    b = attack_accuracy(model, x.float() / 255, y, MEAN, STD, eps_list=(0.01,), method="ifgsm", steps=5)
    assert a["accuracy_%"] == b["accuracy_%"]
    assert (a["method"], a["steps"], a["step_size"], a["n"]) == ("ifgsm", 5, "eps/steps", 12)
    f = attack_accuracy(model, x, y, MEAN, STD, eps_list=(0.01,))
    assert (f["method"], f["steps"], f["step_size"]) == ("fgsm", 1, "eps")


def test_model_mode_is_restored_and_eval_mode_is_used():
    g = torch.Generator().manual_seed(5)
    x = torch.rand(10, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (10,), generator=g)
    model = small_cnn().train()
    bn = model[1]
    before = bn.running_mean.clone()
    attack_accuracy(model, x, y, MEAN, STD, eps_list=(0, 0.01), method="ifgsm", steps=3)
    assert model.training
    assert torch.equal(bn.running_mean, before)  # eval mode: BatchNorm statistics untouched
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    attack_accuracy(model, x, y, MEAN, STD, eps_list=(0.01,))
    assert not model.training


def test_rejects_unknown_method_and_out_of_range_floats():
    model = small_cnn()
    x, y = torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError):
        attack_accuracy(model, x, y, MEAN, STD, method="pgd")
    with pytest.raises(ValueError):
        attack_accuracy(model, x * 255, y, MEAN, STD)


def test_trained_cifar10_model_loses_accuracy_under_attack(cifar10_root):
    from ipsd.data import load_dataset

    data = load_dataset("cifar10", str(cifar10_root), False)
    torch.manual_seed(0)
    x_tr, y_tr = data.train_x[:2000].float() / 255, data.train_y[:2000]
    x_te, y_te = data.test_x[:300], data.test_y[:300]
    m = torch.tensor(data.mean).view(1, 3, 1, 1)
    s = torch.tensor(data.std).view(1, 3, 1, 1)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        i = torch.randint(0, 2000, (64,), generator=g)
        loss = nn.functional.cross_entropy(model((x_tr[i] - m) / s), y_tr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    clean = clean_accuracy(model.eval(), x_te.float() / 255, y_te, data.mean, data.std)
    assert clean > 20.0  # learnt something (chance is 10%)
    for method in ("fgsm", "ifgsm"):
        out = attack_accuracy(model, x_te, y_te, data.mean, data.std, eps_list=(0, 0.05), method=method)
        assert out["accuracy_%"][0.0] == pytest.approx(clean)
        assert out["accuracy_%"][0.05] < out["accuracy_%"][0.0]
