"""KD (spec teacher_kd a.1): loss and gradient against plain formulas, a frozen teacher that neither
learns nor updates its BN statistics while the student trains, config defaults and refusals."""
import math
from functools import partial

import pytest
import torch
from helpers import LinearProbe, assert_teacher_stays_frozen, make_step, random_batch, ref_softmax, teacher_setup

from ipsd.config import ConfigError
from ipsd.resolve import load_methods
from ipsd.teacher import FrozenTeacher

METHODS = load_methods()
KD = METHODS.get("kd")

probe = partial(LinearProbe, scale=0.3, size=8)
setup = partial(teacher_setup, batch=6, image_size=8)
make_batch = partial(random_batch, size=8)
step = partial(make_step, epochs=2)


def reference(zs, zt, y, gamma, alpha, T):
    """gamma * mean CE + alpha * T^2 * (1/B) sum_i sum_c p_t log(p_t / p_s), written out."""
    b = len(y)
    ce = -sum(torch.log(ref_softmax(zs)[i, y[i]]) for i in range(b)) / b
    p_t, p_s = ref_softmax(zt / T), ref_softmax(zs / T)
    kl = sum((p_t[i] * torch.log(p_t[i] / p_s[i])).sum() for i in range(b)) / b
    return gamma * ce, alpha * T * T * kl


@pytest.mark.parametrize("gamma,alpha,T", [(0.1, 0.9, 4.0), (1.0, 0.5, 2.0), (0.3, 2.0, 1.0)])
def test_loss_equals_reference(gamma, alpha, T):
    student, teacher = probe(seed=0), probe(seed=1)
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
    student, teacher = probe(seed=0), probe(seed=1)
    method = KD(KD.resolve_config("resnet8", {}), setup(FrozenTeacher(teacher)))
    batch = make_batch()
    sum(method(student, batch, step()).values()).backward()
    zs, zt = student.outputs[0].detach().double(), teacher.outputs[0].double()
    b, c = zs.shape
    onehot = torch.zeros(b, c, dtype=torch.float64)
    onehot[torch.arange(b), batch.y] = 1
    expected = gamma * (ref_softmax(zs) - onehot) / b + alpha * T * (ref_softmax(zs / T) - ref_softmax(zt / T)) / b
    torch.testing.assert_close(student.outputs[0].grad.double(), expected, rtol=1e-4, atol=1e-7)
    assert not teacher.outputs[0].requires_grad
    assert teacher.w.grad is None and not teacher.w.requires_grad


def test_teacher_is_frozen_while_the_student_trains():
    """Real BN models: a few SGD steps of the student leave the teacher's weights and BN stats unchanged."""
    batches = [make_batch(b=8, classes=10, size=16, seed=i) for i in range(3)]
    assert_teacher_stays_frozen(KD, setup, batches, step)


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
    student, teacher = probe(seed=0), probe(seed=1)
    method = KD(KD.resolve_config("resnet8", {"alpha": 0.0}), setup(FrozenTeacher(teacher)))
    assert set(method(student, make_batch(), step())) == {"ce"}
