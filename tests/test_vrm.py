"""VRM: hand-computed edges, unit norms, the pruning percentile, the loss against a loop reference written
from the spec (a.6), gradient/teacher semantics, the trained adaptor, state and config."""
import copy
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ipsd.config import ConfigError
from ipsd.engine import Task, wrap_ddp
from ipsd.method import Batch, Needs, Setup, Step
from ipsd.resolve import load_methods
from ipsd.models import build_model
from ipsd.teacher import FrozenTeacher

VRM = load_methods().get("vrm")
from baselines.vrm import icv_edges, isv_edges, joint_entropy, keep_mask

R2, R5 = math.sqrt(2), math.sqrt(5)


class LinearProbe(nn.Module):
    """image -> logits, one matrix; records its inputs and keeps its outputs' gradients."""

    def __init__(self, classes=5, seed=0, scale=0.05):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(3 * 32 * 32, classes, generator=g) * scale)
        self.inputs, self.outputs = [], []

    def forward(self, x, features=False):
        self.inputs.append(x)
        z = x.flatten(1) @ self.w
        if z.requires_grad:
            z.retain_grad()
        self.outputs.append(z)
        return z


def setup(teacher, classes=5, model="resnet8", b=4):
    return Setup(model, num_classes=classes, image_size=32, train_size=100, epochs=2, batch_size=b, teacher=teacher)


def make_batch(b=4, classes=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 32, 32, generator=g)
    return Batch(x=x, y=torch.randint(0, classes, (b,), generator=g), index=torch.arange(b),
                 view2=0.7 * x.flip(2) + 0.5 * torch.randn(b, 3, 32, 32, generator=g))


def step():
    return Step(1, 240, torch.Generator().manual_seed(0))


def build(args=None, classes=5, teacher_seed=1, b=4):
    teacher = FrozenTeacher(LinearProbe(classes, seed=teacher_seed, scale=0.1))
    return VRM(VRM.resolve_config("resnet8", args or {}), setup(teacher, classes, b=b)), teacher


# --------------------------------------------------------------------------------------- edges by hand

Z = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # real view, B=2, C=3
ZV = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])  # virtual view


def test_isv_edges_by_hand():
    e = isv_edges(Z, ZV, eps=0.0 + 1e-12)
    expected = torch.tensor([
        [[1 / R2, 0, -1 / R2], [0, 0, 0]],            # z0 - zv0 = (1,0,-1); z0 - zv1 = 0 (same point)
        [[0, 1 / R2, -1 / R2], [-1 / R2, 1 / R2, 0]],  # z1 - zv0 = (0,1,-1); z1 - zv1 = (-1,1,0)
    ])
    assert e.shape == (2, 2, 3)
    torch.testing.assert_close(e, expected)


def test_icv_edges_by_hand_mirror_and_difference():
    # columns over the batch: w0=(1,0), w1=(0,1), w2=(0,0); virtual wv0=(0,1), wv1=(0,0), wv2=(1,0)
    mirror = torch.tensor([
        [[1 / R2, -1 / R2], [1, 0], [0, 0]],
        [[0, 0], [0, 1], [-1 / R2, 1 / R2]],
        [[0, -1], [0, 0], [-1, 0]],
    ])
    torch.testing.assert_close(icv_edges(Z, ZV, 1e-12, "mirror"), mirror)
    # v_c = w_c - wv_c: v0=(1,-1), v1=(0,1), v2=(-1,0); edges normalize(v_c - v_d)
    diff = torch.tensor([
        [[0, 0], [1 / R5, -2 / R5], [2 / R5, -1 / R5]],
        [[-1 / R5, 2 / R5], [0, 0], [1 / R2, 1 / R2]],
        [[-2 / R5, 1 / R5], [-1 / R2, -1 / R2], [0, 0]],
    ])
    torch.testing.assert_close(icv_edges(Z, ZV, 1e-12, "difference"), diff)


def test_edges_are_unit_vectors_and_eps_enters_the_norm():
    g = torch.Generator().manual_seed(0)
    z, zv = torch.randn(6, 7, generator=g), torch.randn(6, 7, generator=g)
    for e, d in ((isv_edges(z, zv), 7), (icv_edges(z, zv), 6)):
        torch.testing.assert_close(e.norm(dim=-1), torch.ones(e.shape[:-1]))
        assert e.shape[-1] == d
    small = torch.tensor([[3e-8, 0.0]]), torch.zeros(1, 2)
    assert math.isclose(isv_edges(*small, eps=1e-8)[0, 0, 0].item(), 3e-8 / (3e-8 + 1e-8), rel_tol=1e-5)


# ------------------------------------------------------------------------------------------- pruning

@pytest.mark.parametrize("n_side,m", [(10, 90), (8, 75), (8, 50), (5, 90), (12, 95), (5, 50), (11, 90)])
def test_pruning_keeps_exactly_the_percentile(n_side, m):
    n = n_side * n_side
    h = torch.randperm(n, generator=torch.Generator().manual_seed(n + m)).float().view(n_side, n_side) / 7
    keep = keep_mask(h, m)
    expected = math.floor(m / 100 * (n - 1)) + 1  # numpy.percentile (linear) over distinct values
    assert int(keep.sum()) == expected
    assert int((h.numpy() <= np.percentile(h.numpy(), m)).sum()) == expected
    assert h[keep].max() < h[~keep].min()  # the lowest-entropy edges survive
    assert keep_mask(h, 100).all()


def test_joint_entropy_of_the_product_distribution():
    g = torch.Generator().manual_seed(0)
    z, zv = torch.randn(3, 4, generator=g).double(), torch.randn(3, 4, generator=g).double()
    h = joint_entropy(z, zv, T=2.0)
    for i in range(3):
        for j in range(3):
            p = torch.exp(z[i] / 2) / torch.exp(z[i] / 2).sum()
            q = torch.exp(zv[j] / 2) / torch.exp(zv[j] / 2).sum()
            joint = p[:, None] * q[None, :]
            assert math.isclose(h[i, j].item(), -(joint * joint.log()).sum().item(), rel_tol=1e-9)
            mix = (p + q) / 2
            assert math.isclose(joint_entropy(z, zv, 2.0, "mixture")[i, j].item(), -(mix * mix.log()).sum().item(),
                                rel_tol=1e-9)


# ------------------------------------------------------------------------------ loss vs a loop reference

def reference(method, zs, zsv, zt, ztv, y, c):
    """Spec a.6 with plain loops in float64: returns (ce, vrm_isv, vrm_icv)."""
    zs, zsv, zt, ztv = (t.detach().double() for t in (zs, zsv, zt, ztv))
    b, k = zs.shape

    def softmax(v):
        e = torch.exp(v - v.max())
        return e / e.sum()

    def ce(z):
        return sum(-math.log(softmax(z[i])[y[i]].item()) for i in range(b)) / b

    def adapt(z):
        if not c["adaptor"]:
            return z
        (l1, _, l2) = method.adaptor
        w1, b1, w2, b2 = (p.detach().double() for p in (l1.weight, l1.bias, l2.weight, l2.bias))
        return torch.stack([w2 @ torch.clamp(w1 @ row + b1, min=0) + b2 for row in z])

    def zsn(z):
        if not c["zsnorm"]:
            return z
        rows = []
        for row in z:
            mean = row.sum() / k
            std = math.sqrt(((row - mean) ** 2).sum().item() / (k - 1))
            rows.append((row - mean) / (std + 1e-7))
        return torch.stack(rows)

    def unit(v):
        return v / (math.sqrt((v ** 2).sum().item()) + 1e-8)

    s, sv, t, tv = zsn(adapt(zs)), zsn(adapt(zsv)), zsn(zt), zsn(ztv)

    def entropy(p):
        return -sum(pi * math.log(pi) for pi in p.tolist())

    def joint(a, bb, i, j, T):  # rows a[i], bb[j] are logits
        p, q = softmax(a[i] / T), softmax(bb[j] / T)
        if c["joint_entropy"] == "product":
            return entropy(p) + entropy(q)
        return entropy((p + q) / 2)

    def phi(pairs_s, pairs_t, kept):
        total, count = 0.0, 0
        for key in kept:
            es, et = pairs_s[key], pairs_t[key]
            if c["distance"] == "cosine":
                cos = (es @ et).item() / max(es.norm().item() * et.norm().item(), 1e-8)
                total, count = total + 1 - cos, count + 1
                continue
            d = es - et
            if c["distance"] == "mse":
                total += (d ** 2).sum().item()
            elif c["distance"] == "l1":
                total += d.abs().sum().item()
            else:
                total += sum(0.5 * x * x if abs(x) < 1 else abs(x) - 0.5 for x in d.tolist())
            count += len(d)
        return total / count

    def keep_by_percentile(ent, m):
        thr = np.percentile(np.array(list(ent.values())), m)
        return [key for key, v in ent.items() if v <= thr]

    isv_s = {(i, j): unit(s[i] - sv[j]) for i in range(b) for j in range(b)}
    isv_t = {(i, j): unit(t[i] - tv[j]) for i in range(b) for j in range(b)}
    ent = {(i, j): joint(zs, zsv, i, j, c["entropy_T"]) for i in range(b) for j in range(b)}
    kept = keep_by_percentile(ent, c["prune_m"])

    cols = lambda a: [a[:, q] for q in range(k)]
    ws, wsv, wt, wtv = cols(s), cols(sv), cols(t), cols(tv)
    if c["icv_vertices"] == "mirror":
        icv_s = {(p, q): unit(ws[p] - wsv[q]) for p in range(k) for q in range(k)}
        icv_t = {(p, q): unit(wt[p] - wtv[q]) for p in range(k) for q in range(k)}
    else:
        vs = [ws[p] - wsv[p] for p in range(k)]
        vt = [wt[p] - wtv[p] for p in range(k)]
        icv_s = {(p, q): unit(vs[p] - vs[q]) for p in range(k) for q in range(k)}
        icv_t = {(p, q): unit(vt[p] - vt[q]) for p in range(k) for q in range(k)}
    if c["prune_icv"]:
        ent_c = {(p, q): joint(zs.t(), zsv.t(), p, q, c["entropy_T"]) for p in range(k) for q in range(k)}
        kept_c = keep_by_percentile(ent_c, c["prune_m"])
    else:
        kept_c = list(icv_s)
    ce_total = ce(zs) + ce(zsv)
    if c["ce_views"] == "mean":
        ce_total /= 2
    return (c["gamma"] * ce_total, c["alpha"] * phi(isv_s, isv_t, kept), c["beta"] * phi(icv_s, icv_t, kept_c))


DEFAULTS = {"gamma": 1.0, "alpha": 128.0, "beta": 32.0, "adaptor": True, "zsnorm": True, "distance": "mse",
            "prune_m": 90.0, "prune_icv": False, "joint_entropy": "product", "entropy_T": 1.0,
            "icv_vertices": "mirror", "ce_views": "sum"}


@pytest.mark.parametrize("args", [
    {},
    {"distance": "l1", "prune_m": 50.0},
    {"distance": "smoothl1", "adaptor": False, "zsnorm": False},
    {"distance": "cosine", "icv_vertices": "difference"},
    {"prune_icv": True, "joint_entropy": "mixture", "entropy_T": 2.0, "ce_views": "mean", "gamma": 0.5},
    {"alpha": 3.0, "beta": 5.0, "prune_m": 75.0},
])
def test_loss_equals_reference(args):
    method, teacher = build(args, b=6)
    model, batch = LinearProbe(), make_batch(b=6)
    losses = method(model, batch, step())
    assert set(losses) == {"ce", "vrm_isv", "vrm_icv"}
    assert len(model.inputs) == 2 and model.inputs[0] is batch.x and model.inputs[1] is batch.view2
    zs, zsv = model.outputs
    zt, ztv = teacher.model.outputs[-2:]
    assert torch.equal(teacher.model.inputs[-2], batch.x) and torch.equal(teacher.model.inputs[-1], batch.view2)
    ref = reference(method, zs, zsv, zt, ztv, batch.y.tolist(), {**DEFAULTS, **args})
    for name, r in zip(("ce", "vrm_isv", "vrm_icv"), ref):
        assert r > 1e-4, name
        assert math.isclose(losses[name].item(), r, rel_tol=2e-5), (name, losses[name].item(), r)


def test_pruning_changes_the_loss_and_kd_is_optional():
    batch = make_batch(b=6)
    torch.manual_seed(0)  # the same adaptor initialisation for both
    full = build({"prune_m": 100.0})[0](LinearProbe(), batch, step())
    torch.manual_seed(0)
    pruned = build({})[0](LinearProbe(), batch, step())
    assert not math.isclose(full["vrm_isv"].item(), pruned["vrm_isv"].item(), rel_tol=1e-4)
    assert math.isclose(full["vrm_icv"].item(), pruned["vrm_icv"].item(), rel_tol=1e-6)  # ICV not pruned
    with_kd = build({"kd_weight": 0.5, "T": 2.0, "alpha": 0.0, "beta": 0.0})[0]
    losses = with_kd(LinearProbe(), batch, step())
    assert set(losses) == {"ce", "kd"} and with_kd.adaptor is None


# ------------------------------------------------------------------------------------------ gradients

def test_pruned_edges_give_no_gradient_and_teacher_side_has_none():
    """Sample 0 gets a uniform prediction (maximum entropy), so with B=10 and m=90 exactly its 10 ISV edges
    are pruned and its real-view logits receive no ISV gradient; the teacher outputs need no gradient."""
    b = 10
    method, teacher = build({"beta": 0.0}, b=b)
    model, batch = LinearProbe(scale=0.2), make_batch(b=b)
    batch.x[0] = 0  # logits exactly 0: uniform softmax
    losses = method(model, batch, step())
    assert set(losses) == {"ce", "vrm_isv"}
    zs, zsv = model.outputs
    gz, gzv = torch.autograd.grad(losses["vrm_isv"], [zs, zsv])
    assert torch.count_nonzero(gz[0]) == 0
    assert (gz[1:].abs().sum(1) > 0).all() and (gzv.abs().sum(1) > 0).all()
    assert not any(t.requires_grad for t in teacher.model.outputs)


def test_teacher_is_frozen_through_training_steps():
    torch.manual_seed(0)
    student = build_model("resnet8", 10)
    teacher = FrozenTeacher(build_model("resnet8", 10))
    before = copy.deepcopy(teacher.model.state_dict())
    st = Setup("resnet8", num_classes=10, image_size=32, train_size=64, epochs=2, batch_size=8,
               family="cifar_resnet", stage_channels=tuple(student.stage_channels),
               num_features=student.num_features, teacher=teacher)
    method = VRM(VRM.resolve_config("resnet8", {}), st)
    adaptor_before = copy.deepcopy(method.adaptor.state_dict())
    student_before = copy.deepcopy(student.state_dict())
    opt = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x = torch.randn(8, 3, 32, 32, generator=g)
        batch = Batch(x=x, y=torch.randint(0, 10, (8,), generator=g), index=torch.arange(8),
                      view2=x + 0.3 * torch.randn(8, 3, 32, 32, generator=g))
        loss = sum(method(student, batch, step()).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not teacher.model.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    after = teacher.model.state_dict()  # weights AND BatchNorm running statistics
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(student_before[k], v) for k, v in student.state_dict().items())
    assert not all(torch.equal(adaptor_before[k], v) for k, v in method.adaptor.state_dict().items())
    assert not any(k.startswith("teacher") for k in method.state_dict())


# ------------------------------------------------------------------------------- adaptor, state, config

def test_adaptor_is_a_trained_child_and_state_round_trips():
    method = build({})[0]
    names = {n for n, _ in method.named_parameters()}
    assert names == {"adaptor.0.weight", "adaptor.0.bias", "adaptor.2.weight", "adaptor.2.bias"}
    assert method.adaptor[0].weight.shape == (5, 5) and method.adaptor[2].weight.shape == (5, 5)
    assert build({"adaptor_hidden": 7})[0].adaptor[0].weight.shape == (7, 5)
    assert list(build({"adaptor": False})[0].parameters()) == []
    torch.manual_seed(123)
    fresh = build({})[0]
    assert not torch.equal(fresh.adaptor[0].weight, method.adaptor[0].weight)
    fresh.load_state_dict(method.state_dict())
    for k, v in method.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v)


def test_config_defaults_needs_and_refusals():
    cfg = VRM.resolve_config("resnet8", {})
    assert (cfg.gamma, cfg.alpha, cfg.beta, cfg.kd_weight) == (1.0, 128.0, 32.0, 0.0)
    assert (cfg.joint_entropy, cfg.prune_m, cfg.distance, cfg.icv_vertices, cfg.prune_icv) == \
        ("product", 90.0, "mse", "mirror", False)
    assert (cfg.adaptor, cfg.adaptor_hidden, cfg.zsnorm, cfg.ce_views, cfg.entropy_T, cfg.edge_eps) == \
        (True, None, True, "sum", 1.0, 1e-8)
    assert (cfg.ra_variant, cfg.ra_n, cfg.ra_magnitude, cfg.ra_cutout) == ("fixmatch", 2, None, None)
    assert (cfg.student_forward, cfg.relations) == ("separate", "global")
    method = build({})[0]
    assert VRM.needs_teacher and method.needs.views == 2 and method.needs.strong_view2
    for bad, match in [({"prune_m": 101}, "prune_m=101"), ({"distance": "l2"}, "distance='l2'"),
                       ({"alpha": -1}, "alpha=-1"), ({"entropy_T": 0}, "entropy_T=0"),
                       ({"joint_entropy": "sum"}, "joint_entropy"), ({"bogus": 1}, "bogus")]:
        with pytest.raises(ConfigError, match=match):
            VRM.resolve_config("resnet8", bad)
    with pytest.raises(ConfigError, match="ra_magnitude=11"):
        build({"ra_magnitude": 11})
    with pytest.raises(ConfigError, match="needs a teacher"):
        VRM(VRM.resolve_config("resnet8", {}), setup(None))
    assert dict(build({"ra_n": 3})[0].needs.strong_args)["n"] == 3  # forwarded to the loader
    assert build({"ra_magnitude": 10, "ra_cutout": 0.5})[0].needs == Needs(views=2, strong_view2=True)


def test_joint_student_forward_and_missing_view():
    method = build({"student_forward": "joint"})[0]
    model, batch = LinearProbe(), make_batch()
    method(model, batch, step())
    assert len(model.inputs) == 1 and torch.equal(model.inputs[0], torch.cat([batch.x, batch.view2]))
    batch.view2 = None
    with pytest.raises(ValueError, match="view2"):
        method(LinearProbe(), batch, step())


# ------------------------------------------------------------------------------------------------ DDP

def _ddp_task():
    torch.manual_seed(0)  # identical adaptor on both ranks and in the reference
    method, _ = build({"prune_icv": True}, b=8)
    return Task(LinearProbe(), method)


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    b, s = make_batch(b=8), slice(4 * rank, 4 * rank + 4)
    task = wrap_ddp(_ddp_task(), torch.device("cpu"))
    losses = task(Batch(x=b.x[s], y=b.y[s], index=b.index[s], view2=b.view2[s]), step())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in task.module.named_parameters()}
    torch.save([{k: v.detach() for k, v in losses.items()}, grads], f"{out}/{rank}.pt")
    dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # two spawned processes (a few seconds of imports)
def test_global_relations_under_ddp_equal_the_single_process_batch(tmp_path):
    """Two ranks with 4 samples each: the graphs over the all-gathered batch give the 8-sample losses, and
    DDP's averaged gradients (student and adaptor) equal the single-process ones. This also guards the
    gloo all_gather backward, which mis-orders non-contiguous gradients (ICV uses the gathered logits
    transposed)."""
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    task = _ddp_task()
    losses = task(make_batch(b=8), step())
    sum(losses.values()).backward()
    for rank in (0, 1):
        got, grads = torch.load(tmp_path / f"{rank}.pt")
        for k in ("vrm_isv", "vrm_icv"):
            torch.testing.assert_close(got[k], losses[k].detach())
        for n, p in task.named_parameters():
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-5)
