"""AT (spec teacher_kd a.2, (f) 5): code and paper variants against plain formulas, pooling of the larger
map before the attention map, stage pairing by index, the Table-4 shapes, a frozen teacher, config."""
import math
from functools import partial

import pytest
import torch
from helpers import assert_teacher_stays_frozen, make_step, random_batches, teacher_setup
from torch import nn

from baselines.at import match_spatial, stage_pairs
from ipsd.config import ConfigError
from ipsd.method import Batch
from ipsd.resolve import load_methods
from ipsd.models import Features, build_model
from ipsd.teacher import FrozenTeacher

METHODS = load_methods()
AT = METHODS.get("at")


class Stub(nn.Module):
    """A 'model' whose logits and stage maps are fixed tensors (parameters: the student side gets grads)."""

    def __init__(self, logits, stages):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.maps = nn.ParameterList([nn.Parameter(s.clone()) for s in stages])
        self.inputs = []

    def forward(self, x, features=False):
        self.inputs.append(x)
        if not features:
            return self.logits
        maps = list(self.maps)
        return self.logits, Features(stem=maps[0], stages=maps, pre_pool=maps[-1], pooled=maps[-1].mean((2, 3)))


setup = partial(teacher_setup, classes=5, batch=3)
step = partial(make_step, epochs=2)


def rand(*shape, seed):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))  # >= 0, like post-ReLU maps


B = 3
# (student, teacher) per stage: equal, teacher larger (pooled 32->16), student larger (pooled 8->4), equal
S_SHAPES = [(B, 4, 32, 32), (B, 6, 16, 16), (B, 8, 8, 8), (B, 5, 4, 4)]
T_SHAPES = [(B, 7, 32, 32), (B, 3, 32, 32), (B, 9, 4, 4), (B, 2, 4, 4)]


def make(seed=0):
    s = [rand(*sh, seed=seed + i) for i, sh in enumerate(S_SHAPES)]
    t = [rand(*sh, seed=seed + 10 + i) for i, sh in enumerate(T_SHAPES)]
    zs, zt = torch.randn(B, 5, generator=torch.Generator().manual_seed(seed + 20)), torch.randn(B, 5)
    return Stub(zs, s), Stub(zt, t)


def block_mean(f, size):
    """Average non-overlapping k x k blocks (k = H / size): adaptive pooling for divisible sizes, by hand."""
    b, c, h, _ = f.shape
    k = h // size
    return f.reshape(b, c, size, k, size, k).mean((3, 5))


def reference_at(s_maps, t_maps, mode):
    """Sum over pairs; code: mean_{i,hw} (a_s - a_t)^2 with a = q/||q||, q = channel-mean of f^2;
    paper: mean_i 0.5 * ||a_s - a_t||_2 with q = channel-sum of f^2."""
    total = 0.0
    for fs, ft in zip(s_maps, t_maps):
        fs, ft = fs.double(), ft.double()
        size = min(fs.shape[2], ft.shape[2])
        fs, ft = block_mean(fs, size), block_mean(ft, size)
        maps = []
        for f in (fs, ft):
            q = (f * f).sum(1) / (f.shape[1] if mode == "code" else 1)
            q = q.reshape(len(q), -1)
            maps.append(q / torch.sqrt((q * q).sum(1, keepdim=True)))
        d = maps[0] - maps[1]
        if mode == "code":
            total = total + (d * d).sum() / d.numel()
        else:
            total = total + 0.5 * torch.sqrt((d * d).sum(1)).sum() / len(d)
    return total


@pytest.mark.parametrize("mode", ["code", "paper"])
def test_loss_equals_reference(mode):
    student, teacher = make()
    method = AT(AT.resolve_config("resnet8", {"mode": mode}), setup(FrozenTeacher(teacher)))
    x = torch.randn(B, 3, 32, 32)
    y = torch.tensor([0, 3, 1])
    losses = method(student, Batch(x=x, y=y, index=torch.arange(B)), step())
    assert set(losses) == {"ce", "at"}  # alpha 0 by default
    assert torch.equal(teacher.inputs[0], x)
    ref = 1000.0 * reference_at([p.detach() for p in student.maps], list(teacher.maps), mode)
    assert math.isclose(losses["at"].item(), ref.item(), rel_tol=1e-5)
    p = torch.softmax(student.logits.detach().double(), 1)
    assert math.isclose(losses["ce"].item(), -torch.log(p[torch.arange(B), y]).mean().item(), rel_tol=1e-5)


def test_code_and_paper_variants_differ():
    student, teacher = make()
    s_maps, t_maps = [p.detach() for p in student.maps], [p.detach() for p in teacher.maps]
    assert not math.isclose(reference_at(s_maps, t_maps, "code"), reference_at(s_maps, t_maps, "paper"),
                            rel_tol=1e-2)


def test_kd_term_when_alpha_positive():
    student, teacher = make()
    method = AT(AT.resolve_config("resnet8", {"alpha": 0.5, "T": 2.0}), setup(FrozenTeacher(teacher)))
    losses = method(student, Batch(x=torch.randn(B, 3, 32, 32), y=torch.tensor([0, 1, 2]), index=torch.arange(B)),
                    step())
    ps, pt = torch.softmax(student.logits.detach().double() / 2, 1), torch.softmax(teacher.logits.double() / 2, 1)
    ref = 0.5 * 4 * (pt * torch.log(pt / ps)).sum(1).mean()
    assert math.isclose(losses["kd"].item(), ref.item(), rel_tol=1e-4)


def test_gradients_pool_before_the_attention_map_and_skip_the_teacher():
    student, teacher = make()
    method = AT(AT.resolve_config("resnet8", {"gamma": 0.0}), setup(FrozenTeacher(teacher)))
    losses = method(student, Batch(x=torch.randn(B, 3, 32, 32), y=torch.tensor([0, 1, 2]), index=torch.arange(B)),
                    step())
    losses["at"].backward()
    for p in student.maps:
        assert p.grad is not None and p.grad.abs().sum() > 0
    # reference gradient through the same plain formulas
    s_ref = [p.detach().clone().requires_grad_(True) for p in student.maps]
    (1000.0 * reference_at(s_ref, list(teacher.maps), "code")).backward()
    for p, r in zip(student.maps, s_ref):
        torch.testing.assert_close(p.grad.double(), r.grad.double(), rtol=1e-4, atol=1e-9)
    # stage 3 (student 8x8, teacher 4x4): the student is pooled BEFORE q, so every pixel of a 2x2 block
    # receives the same gradient (pooling after q would weight each pixel by its own activation)
    g = student.maps[2].grad.reshape(B, 8, 4, 2, 4, 2)
    torch.testing.assert_close(g, g[:, :, :, :1, :, :1].expand_as(g))
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())


def test_pairs_by_index_and_unequal_stage_counts():
    s = [torch.zeros(1, 1, h, h) for h in (32, 16, 8)]
    t = [torch.ones(1, 1, h, h) for h in (32, 16, 8, 4)]
    assert [(a.shape[2], b.shape[2]) for a, b in stage_pairs(s, t, "first")] == [(32, 32), (16, 16), (8, 8)]
    assert [(a.shape[2], b.shape[2]) for a, b in stage_pairs(s, t, "last")] == [(32, 16), (16, 8), (8, 4)]
    assert len(stage_pairs(t, t, "first")) == 4


RESNET_S = [((64, 32), (256, 32)), ((128, 16), (512, 16)), ((256, 8), (1024, 8)), ((512, 4), (2048, 4))]
VGG16_S = [((128, 16), (256, 16)), ((256, 8), (512, 8)), ((512, 4), (1024, 4)), ((512, 4), (2048, 4))]
# (teacher, student, ((student C, H), (teacher C, H)) per pair after pooling), spec a.2 / a.7
TABLE4 = [("resnet50", "resnet18", RESNET_S), ("resnet50", "resnet34", RESNET_S), ("resnet101", "vgg16", VGG16_S)]


@pytest.mark.parametrize("t_name,s_name,expected", TABLE4)
def test_table4_pairs(t_name, s_name, expected):
    """The real zoo models at 32x32, batch 2 -- on the meta device: shapes only, no arithmetic (a real CPU
    forward of ResNet101 alone takes seconds). For VGG16 the teacher's maps are pooled 32->16, 16->8, 8->4."""
    with torch.device("meta"), torch.no_grad():
        teacher, student = build_model(t_name, 100), build_model(s_name, 100)
        x = torch.empty(2, 3, 32, 32)
        _, ft = teacher(x, features=True)
        _, fs = student(x, features=True)
    raw_t = [tuple(f.shape[1:3]) for f in ft.stages]
    assert raw_t == [(256, 32), (512, 16), (1024, 8), (2048, 4)]
    got = [match_spatial(a, b) for a, b in stage_pairs(fs.stages, ft.stages, "first")]
    assert [((a.shape[1], a.shape[2]), (b.shape[1], b.shape[2])) for a, b in got] == expected
    assert all(a.shape[2:] == b.shape[2:] and a.shape[0] == b.shape[0] == 2 for a, b in got)


def test_teacher_is_frozen_while_the_student_trains():
    assert_teacher_stays_frozen(AT, setup, random_batches(3, 4, classes=10, size=16), step, key="at")


def test_defaults_and_refusals():
    cfg = AT.resolve_config("resnet18", {})
    assert (cfg.gamma, cfg.alpha, cfg.beta, cfg.p, cfg.mode, cfg.unequal_stages) == (1.0, 0.0, 1000.0, 2.0, "code",
                                                                                     "first")
    assert AT.needs_teacher
    with pytest.raises(ConfigError, match="mode='l2'"):
        AT.resolve_config("resnet18", {"mode": "l2"})
    with pytest.raises(ConfigError, match="beta=-1"):
        AT.resolve_config("resnet18", {"beta": -1})
    with pytest.raises(ConfigError, match="needs a teacher"):
        AT(AT.resolve_config("resnet8", {}), setup(None))
