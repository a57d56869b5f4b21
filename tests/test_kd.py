"""KD (spec teacher_kd a.1): loss and gradient against plain formulas, a frozen teacher that neither
learns nor updates its BN statistics while the student trains, config defaults and refusals."""
import math

import pytest
import torch
from torch import nn

from ipsd.config import ConfigError
from ipsd.method import Batch, Setup, Step, load_methods
from ipsd.models import build_model
from ipsd.teacher import FrozenTeacher

METHODS = load_methods()
KD = METHODS.get("kd")


class LinearProbe(nn.Module):
    """Images -> logits through a fixed linear map; keeps its inputs and outputs for the checks."""

    def __init__(self, classes=5, seed=0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3 * 8 * 8, classes, generator=torch.Generator().manual_seed(seed)) * 0.3)
        self.inputs, self.outputs = [], []

    def forward(self, x, features=False):
        self.inputs.append(x)
        z = x.flatten(1) @ self.w
        if z.requires_grad:
            z.retain_grad()
        self.outputs.append(z)
        return z


def setup(teacher, model="resnet8", classes=5):
    return Setup(model, num_classes=classes, image_size=8, train_size=100, epochs=2, batch_size=6,
                 family="cifar_resnet", teacher=teacher)


def make_batch(b=6, classes=5, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(x=torch.randn(b, 3, size, size, generator=g), y=torch.randint(0, classes, (b,), generator=g),
                 index=torch.arange(b))


def step():
    return Step(1, 2, torch.Generator().manual_seed(0))


def softmax(z):
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def reference(zs, zt, y, gamma, alpha, T):
    """gamma * mean CE + alpha * T^2 * (1/B) sum_i sum_c p_t log(p_t / p_s), written out."""
    b = len(y)
    ce = -sum(torch.log(softmax(zs)[i, y[i]]) for i in range(b)) / b
    p_t, p_s = softmax(zt / T), softmax(zs / T)
    kl = sum((p_t[i] * torch.log(p_t[i] / p_s[i])).sum() for i in range(b)) / b
    return gamma * ce, alpha * T * T * kl


@pytest.mark.parametrize("gamma,alpha,T", [(0.1, 0.9, 4.0), (1.0, 0.5, 2.0), (0.3, 2.0, 1.0)])
def test_loss_equals_reference(gamma, alpha, T):
    student, teacher = LinearProbe(seed=0), LinearProbe(seed=1)
    method = KD(KD.resolve_config("resnet8", {"gamma": gamma, "alpha": alpha, "T": T}), setup(FrozenTeacher(teacher)))
    batch = make_batch()
    losses = method(student, batch, step())
    assert set(losses) == {"ce", "kd"}
    assert torch.equal(teacher.inputs[0], batch.x)  # the teacher sees the identical batch
    zs, zt = student.outputs[0].detach().double(), teacher.outputs[0].double()
    ref_ce, ref_kd = reference(zs, zt, batch.y, gamma, alpha, T)
    assert math.isclose(losses["ce"].item(), ref_ce.item(), rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), ref_kd.item(), rel_tol=1e-4)
    assert ref_kd > 1e-3


def test_gradient_reaches_the_student_only():
    """d/dz_s [alpha T^2 KL_bm] = alpha T (softmax(z_s/T) - softmax(z_t/T)) / B; teacher gets nothing."""
    gamma, alpha, T = 0.1, 0.9, 4.0
    student, teacher = LinearProbe(seed=0), LinearProbe(seed=1)
    method = KD(KD.resolve_config("resnet8", {}), setup(FrozenTeacher(teacher)))
    batch = make_batch()
    sum(method(student, batch, step()).values()).backward()
    zs, zt = student.outputs[0].detach().double(), teacher.outputs[0].double()
    b, c = zs.shape
    onehot = torch.zeros(b, c, dtype=torch.float64)
    onehot[torch.arange(b), batch.y] = 1
    expected = gamma * (softmax(zs) - onehot) / b + alpha * T * (softmax(zs / T) - softmax(zt / T)) / b
    torch.testing.assert_close(student.outputs[0].grad.double(), expected, rtol=1e-4, atol=1e-7)
    assert not teacher.outputs[0].requires_grad
    assert teacher.w.grad is None and not teacher.w.requires_grad


def test_teacher_is_frozen_while_the_student_trains():
    """Real BN models: a few SGD steps of the student leave the teacher's weights and BN stats unchanged."""
    torch.manual_seed(0)
    teacher, student = build_model("resnet8", 10), build_model("resnet8", 10)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    frozen = FrozenTeacher(teacher)
    method = KD(KD.resolve_config("resnet8", {}), setup(frozen, classes=10))
    assert list(method.parameters()) == [] and method.state_dict() == {}  # no teacher in optimizer/checkpoint
    student.train(), method.train()
    opt = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4)
    student_before = [p.clone() for p in student.parameters()]
    for i in range(3):
        losses = method(student, make_batch(b=8, classes=10, size=16, seed=i), step())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # weights, running_mean/var, num_batches_tracked
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))
    fresh = KD(KD.resolve_config("resnet8", {}), setup(frozen, classes=10))
    fresh.load_state_dict(method.state_dict())  # stateless: the round trip is trivially exact


def test_defaults_and_refusals():
    cfg = KD.resolve_config("resnet18", {})
    assert (cfg.gamma, cfg.alpha, cfg.T) == (0.1, 0.9, 4.0)
    assert KD.needs_teacher
    with pytest.raises(ConfigError, match="T=0"):
        KD.resolve_config("resnet18", {"T": 0})
    with pytest.raises(ConfigError, match="alpha=-1"):
        KD.resolve_config("resnet18", {"alpha": -1})
    with pytest.raises(ConfigError, match="did you mean 'gamma'"):
        KD.resolve_config("resnet18", {"gama": 1})
    with pytest.raises(ConfigError, match="needs a teacher"):
        KD(KD.resolve_config("resnet8", {}), setup(None))


def test_alpha_zero_drops_the_kd_term():
    student, teacher = LinearProbe(seed=0), LinearProbe(seed=1)
    method = KD(KD.resolve_config("resnet8", {"alpha": 0.0}), setup(FrozenTeacher(teacher)))
    assert set(method(student, make_batch(), step())) == {"ce"}
