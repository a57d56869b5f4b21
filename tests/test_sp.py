"""SP (spec teacher_kd a.3): a hand-checkable case, the loss and its gradient against plain formulas, the
last-stage tap (ShuffleNetV2!), the global batch under DDP, a frozen teacher, config."""
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
from ipsd.models import Features, build_model
from ipsd.teacher import FrozenTeacher

METHODS = load_methods()
SP = METHODS.get("sp")


class Stub(nn.Module):
    """A 'model' whose logits and last-stage map are fixed tensors (parameters: the student side gets grads);
    pre_pool is a different tensor, to tell the two taps apart."""

    def __init__(self, logits, last):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.last = nn.Parameter(last.clone())
        self.inputs = []

    def forward(self, x, features=False):
        self.inputs.append(x)
        if not features:
            return self.logits
        head = self.last * 2 + 1
        return self.logits, Features(stem=self.last, stages=[self.last], pre_pool=head, pooled=head.mean((2, 3)))


setup = partial(teacher_setup, classes=4, batch=4)
step = partial(make_step, epochs=2)


def batch_of(b, classes=4):
    return Batch(x=torch.randn(b, 3, 8, 8), y=torch.arange(b) % classes, index=torch.arange(b))


def reference_sp(fs, ft):
    """(1/B^2) sum_ij (Gt_ij/||Gt_i.|| - Gs_ij/||Gs_i.||)^2 with G = Q Q^T, Q the flattened maps."""
    b = len(fs)
    out = []
    for f in (fs, ft):
        q = f.double().reshape(b, -1)
        g = q @ q.T
        out.append(g / torch.sqrt((g * g).sum(1, keepdim=True)))
    return ((out[1] - out[0]) ** 2).sum() / b ** 2


def test_hand_checkable_case():
    """Q_s = [[1,0],[0,1]] -> G_s = I (rows already unit). Q_t = [[1,0],[1,0]] -> G_t = all ones, rows
    divided by sqrt(2). Diff: diagonal 1 - 1/sqrt2 (twice), off-diagonal 1/sqrt2 (twice):
    L_SP = (2 (1 - 1/sqrt2)^2 + 2 * 1/2) / 2^2 = (2 - sqrt2) / 2 = 1 - 1/sqrt2 = 0.29289...; times beta 3000."""
    fs = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).reshape(2, 2, 1, 1)
    ft = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).reshape(2, 2, 1, 1)
    method = SP(SP.resolve_config("resnet8", {}), setup(FrozenTeacher(Stub(torch.zeros(2, 4), ft)), batch=2))
    losses = method(Stub(torch.zeros(2, 4), fs), batch_of(2), step())
    assert math.isclose(losses["sp"].item(), 3000 * (1 - 1 / math.sqrt(2)), rel_tol=1e-6)


@pytest.mark.parametrize("b", [1, 5])
def test_loss_and_gradient_equal_reference(b):
    g = torch.Generator().manual_seed(b)
    fs, ft = torch.rand(b, 6, 4, 4, generator=g), torch.rand(b, 9, 4, 4, generator=g)  # channels differ: fine
    student, teacher = Stub(torch.randn(b, 4, generator=g), fs), Stub(torch.randn(b, 4, generator=g), ft)
    method = SP(SP.resolve_config("resnet8", {"beta": 2.0}), setup(FrozenTeacher(teacher), batch=b))
    batch = batch_of(b)
    losses = method(student, batch, step())
    assert set(losses) == {"ce", "sp"} and torch.equal(teacher.inputs[0], batch.x)
    leaf = fs.double().requires_grad_(True)
    ref = 2.0 * reference_sp(leaf, ft)
    assert math.isclose(losses["sp"].item(), ref.item(), rel_tol=1e-5, abs_tol=1e-9)
    losses["sp"].backward()
    ref.backward()
    torch.testing.assert_close(student.last.grad.double(), leaf.grad, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    if b == 1:
        assert losses["sp"].item() == 0.0  # 1x1 Gram = [1] on both sides


def test_tap_is_the_last_stage_not_the_shufflenet_head():
    with torch.device("meta"), torch.no_grad():
        _, f = build_model("shufflenetv2", 100)(torch.empty(2, 3, 32, 32), features=True)
    assert tuple(f.stages[-1].shape[1:]) == (464, 4, 4) and tuple(f.pre_pool.shape[1:]) == (1024, 4, 4)
    # spec a.7: SP taps 2048x4x4 (ResNet50/101) / 512x4x4 (ResNet18/34, VGG16)
    for name, c in (("resnet50", 2048), ("resnet18", 512), ("vgg16", 512)):
        with torch.device("meta"), torch.no_grad():
            _, f = build_model(name, 100)(torch.empty(2, 3, 32, 32), features=True)
        assert tuple(f.stages[-1].shape[1:]) == (c, 4, 4)
    # the method uses stages[-1] by default and pre_pool only when asked
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.rand(3, 2, 2, 2, generator=g), torch.rand(3, 2, 2, 2, generator=g)
    for tap, fn in (("last_stage", lambda f: f), ("pre_pool", lambda f: f * 2 + 1)):
        method = SP(SP.resolve_config("resnet8", {"tap": tap}), setup(FrozenTeacher(Stub(torch.zeros(3, 4), ft))))
        got = method(Stub(torch.zeros(3, 4), fs), batch_of(3), step())["sp"].item()
        assert math.isclose(got, 3000 * reference_sp(fn(fs), fn(ft)).item(), rel_tol=1e-5)


@pytest.mark.slow  # two spawned processes (a few seconds of imports)
def test_global_relations_under_ddp_equal_the_single_process_batch(tmp_path):
    """Two ranks with 4 samples each: relations='global' gives the 8-sample loss and gradient exactly
    (all-gather with gradient + DDP averaging); 'local' gives per-rank losses that differ."""
    assert_global_relations_match_single_process(tmp_path, "sp", side=2)


def test_teacher_is_frozen_while_the_student_trains():
    assert_teacher_stays_frozen(SP, setup, random_batches(3, 4, classes=10, size=16), step, key="sp")


def test_defaults_and_refusals():
    cfg = SP.resolve_config("vgg16", {})
    assert (cfg.gamma, cfg.alpha, cfg.beta, cfg.tap, cfg.relations) == (1.0, 0.0, 3000.0, "last_stage", "global")
    assert SP.needs_teacher
    with pytest.raises(ConfigError, match="tap='pooled'"):
        SP.resolve_config("resnet18", {"tap": "pooled"})
    with pytest.raises(ConfigError, match="beta=-3"):
        SP.resolve_config("resnet18", {"beta": -3})
    with pytest.raises(ConfigError, match="needs a teacher"):
        SP(SP.resolve_config("resnet8", {}), setup(None))
