"""RKD (spec teacher_kd a.4): a 3-point example worked out by hand, a loop reference (both SmoothL1
branches), the gradient through the student's mean normaliser, no teacher gradient, degenerate batches,
the global batch under DDP, a frozen teacher, config."""
import itertools
import math
from functools import partial

import pytest
import torch
from helpers import (
    assert_global_relations_match_single_process,
    assert_teacher_stays_frozen,
    make_step,
    random_batches,
    teacher_setup,
)
from torch import nn

from ipsd.config import ConfigError
from ipsd.method import Batch
from ipsd.resolve import load_methods
from ipsd.models import Features
from ipsd.teacher import FrozenTeacher

METHODS = load_methods()
RKD = METHODS.get("rkd")


class Stub(nn.Module):
    """A 'model' whose pooled embedding is a fixed tensor (a parameter: the student side gets grads)."""

    def __init__(self, points, classes=4):
        super().__init__()
        self.points = nn.Parameter(points.clone())
        self.logits = nn.Parameter(torch.zeros(len(points), classes))
        self.inputs = []

    def forward(self, x, features=False):
        self.inputs.append(x)
        if not features:
            return self.logits
        m = self.points[:, :, None, None] * 3  # stages/pre_pool: not the tap, deliberately different
        return self.logits, Features(stem=m, stages=[m], pre_pool=m, pooled=self.points)


setup = partial(teacher_setup, classes=4, batch=3)
step = partial(make_step, epochs=2)


def batch_of(b, classes=4):
    return Batch(x=torch.randn(b, 3, 8, 8), y=torch.arange(b) % classes, index=torch.arange(b))


def run(student_pts, teacher_pts, **args):
    student, teacher = Stub(student_pts), Stub(teacher_pts)
    method = RKD(RKD.resolve_config("resnet8", args), setup(FrozenTeacher(teacher), batch=len(student_pts)))
    batch = batch_of(len(student_pts))
    losses = method(student, batch, step())
    assert torch.equal(teacher.inputs[0], batch.x)
    return losses, student, teacher


# Student: the 3-4-5 right triangle A=(0,0), B=(3,0), C=(0,4); teacher: A=(0,0), B=(4,0), C=(0,3).
S3 = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
T3 = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 3.0]])


def test_three_points_by_hand():
    """Distances. Student |AB|=3, |AC|=4, |BC|=5; teacher |AB|=4, |AC|=3, |BC|=5. Both means over the 6
    positive entries are (3+4+5)*2/6 = 4, so d^s = (AB .75, AC 1, BC 1.25) and d^t = (AB 1, AC .75, BC 1.25).
    Differences: AB -.25 and AC +.25 (each twice, ij and ji), BC 0, diagonal 0. SmoothL1 (|x|<1):
    0.5 * .25^2 = 1/32 for 4 entries = 1/8, averaged over B^2 = 9: L_D = 1/72.
    Angles: theta[a,b,c] = cos of the angle at a; entries with b==a or c==a are 0 on both sides, b==c!=a
    give 1 on both sides, leaving 2 ordered entries per vertex. Student: at A cos 90 = 0; at B
    <(-1,0), (-3,4)/5> = 3/5; at C <(0,-1), (3,-4)/5> = 4/5. Teacher: A 0; B <(-1,0), (-4,3)/5> = 4/5;
    C <(0,-1), (4,-3)/5> = 3/5. Differences: B -1/5 (x2), C +1/5 (x2): SmoothL1 0.5 * 1/25 = 1/50 each,
    4/50 over B^3 = 27 entries: L_A = 4/1350 = 2/675.
    L_RKD = 25/72 + 50 * 2/675 = 25/72 + 4/27 = (75 + 32)/216 = 107/216 (beta 1)."""
    assert math.isclose(run(S3, T3, w_angle=0.0)[0]["rkd"].item(), 25 / 72, rel_tol=1e-6)
    assert math.isclose(run(S3, T3, w_dist=0.0)[0]["rkd"].item(), 100 / 675, rel_tol=1e-6)
    losses = run(S3, T3)[0]
    assert set(losses) == {"ce", "rkd"}
    assert math.isclose(losses["rkd"].item(), 107 / 216, rel_tol=1e-6)
    assert math.isclose(run(S3, T3, beta=2.0)[0]["rkd"].item(), 214 / 216, rel_tol=1e-6)
    assert run(S3, S3 * 7)[0]["rkd"].item() < 1e-6  # scale-free: a scaled copy of the teacher costs nothing


def smooth_l1(x):
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def reference_rkd(es, et, w_d=25.0, w_a=50.0):
    """Loops over pairs and triples, in float64, written from the spec's formulas."""
    b = len(es)

    def dist_matrix(e):
        d = [[0.0 if i == j else torch.sqrt(((e[i] - e[j]) ** 2).sum()) for j in range(b)] for i in range(b)]
        pos = [d[i][j] for i in range(b) for j in range(b) if i != j]
        mu = sum(pos) / len(pos)
        return [[d[i][j] / mu for j in range(b)] for i in range(b)]

    def unit(v):
        n = torch.sqrt((v * v).sum())
        return v * 0 if n == 0 else v / n

    def angle(e, a, p, q):
        return (unit(e[p] - e[a]) * unit(e[q] - e[a])).sum()

    ds, dt = dist_matrix(es), dist_matrix(et)
    l_d = sum(smooth_l1(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b ** 2
    l_a = sum(smooth_l1(angle(es, a, p, q) - angle(et, a, p, q))
              for a, p, q in itertools.product(range(b), repeat=3)) / b ** 3
    return w_d * l_d + w_a * l_a, ds, dt


def test_loop_reference_with_both_smooth_l1_branches():
    g = torch.Generator().manual_seed(0)
    es, et = torch.randn(5, 3, generator=g), torch.randn(5, 6, generator=g)  # widths differ: fine
    es[0] += 30.0  # an outlier: some normalised student distances differ by more than 1 from the teacher's
    ref, ds, dt = reference_rkd(es.double(), et.double(), 25.0, 50.0)
    assert max(abs(ds[i][j] - dt[i][j]) for i in range(5) for j in range(5)) > 1  # linear branch exercised
    losses = run(es, et)[0]
    assert math.isclose(losses["rkd"].item(), ref.item(), rel_tol=1e-5)


def test_student_gradient_flows_through_the_mean_and_teacher_gets_none():
    g = torch.Generator().manual_seed(1)
    es, et = torch.randn(4, 3, generator=g), torch.randn(4, 5, generator=g)
    losses, student, teacher = run(es, et, gamma=0.0)
    losses["rkd"].backward()
    leaf = es.double().requires_grad_(True)
    reference_rkd(leaf, et.double())[0].backward()
    torch.testing.assert_close(student.points.grad.double(), leaf.grad, rtol=1e-4, atol=1e-8)
    # the same loss with the student's mean detached has another gradient: the mean path matters
    det = es.double().requires_grad_(True)
    d = torch.cdist(det, det)
    d_hat = d / d.detach()[d.detach() > 0].mean()
    with torch.no_grad():
        dt = torch.cdist(et.double(), et.double())
        dt = dt / dt[dt > 0].mean()
    torch.nn.functional.smooth_l1_loss(d_hat, dt).mul(25).backward()
    leaf_d = es.double().requires_grad_(True)
    reference_rkd(leaf_d, et.double(), w_a=0.0)[0].backward()
    assert not torch.allclose(det.grad, leaf_d.grad, atol=1e-6)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_degenerate_batches_are_finite():
    losses, student, _ = run(torch.randn(1, 3), torch.randn(1, 3))  # a last batch of one sample
    assert losses["rkd"].item() == 0.0
    losses["rkd"].backward()
    assert torch.isfinite(student.points.grad).all()
    pts = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]])  # two identical samples
    losses, student, _ = run(pts, torch.randn(3, 4))
    losses["rkd"].backward()
    assert torch.isfinite(losses["rkd"]) and torch.isfinite(student.points.grad).all()


@pytest.mark.slow  # two spawned processes (a few seconds of imports)
def test_global_relations_under_ddp_equal_the_single_process_batch(tmp_path):
    """Two ranks with 4 samples each: relations='global' gives the 8-sample loss and gradient exactly
    (all-gather with gradient + DDP averaging); 'local' gives per-rank losses that differ."""
    assert_global_relations_match_single_process(tmp_path, "rkd", side=1)


def test_teacher_is_frozen_while_the_student_trains():
    assert_teacher_stays_frozen(RKD, setup, random_batches(3, 4, classes=10, size=16), step, key="rkd")


def test_defaults_and_refusals():
    cfg = RKD.resolve_config("resnet34", {})
    assert (cfg.gamma, cfg.alpha, cfg.beta, cfg.w_dist, cfg.w_angle, cfg.relations) == (1.0, 0.0, 1.0, 25.0, 50.0,
                                                                                         "global")
    assert RKD.needs_teacher
    with pytest.raises(ConfigError, match="w_angle=-1"):
        RKD.resolve_config("resnet18", {"w_angle": -1})
    with pytest.raises(ConfigError, match="relations='all'"):
        RKD.resolve_config("resnet18", {"relations": "all"})
    with pytest.raises(ConfigError, match="needs a teacher"):
        RKD(RKD.resolve_config("resnet8", {}), setup(None))
