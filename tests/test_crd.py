"""CRD: NCE loss and gradients against an independent reference, memory update, Z, the negative sampler,
the frozen teacher, state round trip, and identical memory banks across two DDP ranks."""
import math

import pytest
import torch
from helpers import assert_teacher_untouched, gloo_group, make_step, snapshot, spawn_two
from torch import nn

from ipsd.config import ConfigError
from ipsd.method import Batch, Setup
from ipsd.resolve import load_methods
from ipsd.models import Features, build_model
from ipsd.teacher import FrozenTeacher

CRD = load_methods().get("crd")
crd_module = __import__(CRD.__module__, fromlist=["ClassTable"])
ClassTable, draw_negatives = crd_module.ClassTable, crd_module.draw_negatives


class TinyNet(nn.Module):
    """Image -> ReLU(linear) 'pooled' vector -> linear logits, with the Features interface."""

    def __init__(self, feat: int, classes: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_features = feat
        self.w = nn.Parameter(torch.randn(3 * 4 * 4, feat, generator=g) * 0.3)
        self.classifier = nn.Linear(feat, classes)
        self.pooled = []

    def forward(self, x, features=False):
        h = (x.flatten(1) @ self.w).relu()
        if h.requires_grad:
            h.retain_grad()
        self.pooled.append(h)
        z = self.classifier(h)
        return (z, Features(stem=h, stages=[h], pre_pool=h[:, :, None, None], pooled=h)) if features else z


def with_labels(labels, **fields):
    return Setup(**fields, train_labels=labels)


N, C, DS, DT, B = 12, 3, 5, 7, 4
LABELS = torch.arange(N) % C


def tiny(args=None, seed=0, teacher=None):
    torch.manual_seed(seed)
    teacher = teacher or FrozenTeacher(TinyNet(DT, C, seed=11))
    setup = with_labels(LABELS, model="resnet8", num_classes=C, image_size=4, train_size=N, epochs=2, batch_size=B,
                        num_features=DS, teacher=teacher)
    return CRD(CRD.resolve_config("resnet8", {"nce_k": 5, "feat_dim": 4, **(args or {})}), setup)


def batch(index, seed=1):
    g = torch.Generator().manual_seed(seed)
    index = torch.as_tensor(index)
    return Batch(x=torch.randn(len(index), 3, 4, 4, generator=g), y=LABELS[index], index=index)


def step(seed=0):
    return make_step(epochs=2, seed=seed)


def same_draw(method, b, s):
    """The contrast indices the method will draw from ``s.generator`` (drawn from a copy of its state)."""
    g = torch.Generator()
    g.set_state(s.generator.get_state())
    return method.contrast_indices(b.index, g)


def reference(method, idx, hs, ht, mem_s, mem_t, z=None):
    """Spec a.5 in plain float64 formulas: embeddings, scores, Z (unless given), NCE with uniform noise."""
    c, n = method.cfg, N
    ws, bs = method.embed_s.weight.double(), method.embed_s.bias.double()
    wt, bt = method.embed_t.weight.double(), method.embed_t.bias.double()
    es, et = hs @ ws.T + bs, ht @ wt.T + bt
    gs, gt = es / es.pow(2).sum(1, keepdim=True).sqrt(), et / et.pow(2).sum(1, keepdim=True).sqrt()
    v = torch.exp((mem_t.double()[idx] * gs[:, None, :]).sum(2) / c.nce_t)  # student-anchored
    u = torch.exp((mem_s.double()[idx] * gt[:, None, :]).sum(2) / c.nce_t)  # teacher-anchored
    if z is None:
        z = (n * v.detach().mean(), n * u.detach().mean())
    k = idx.shape[1] - 1
    noise = k * (1.0 / n)

    def nce(s):
        p_pos = s[:, 0] / (s[:, 0] + noise + 1e-7)
        p_neg = s[:, 1:] / (s[:, 1:] + noise + 1e-7)
        return -(torch.log(p_pos).sum() + torch.log(1 - p_neg).sum()) / len(s)

    loss = c.beta * (nce(v / z[0]) + nce(u / z[1]))
    return loss, z, gs, gt


def updated(bank, index, g, m):
    """M[index] <- (m M[index] + (1 - m) g) / ||.||, other rows kept."""
    rows = m * bank.double()[index] + (1 - m) * g.detach()
    out = bank.double().clone()
    out[index] = rows / rows.pow(2).sum(1, keepdim=True).sqrt()
    return out


def run_step(method, b, s):
    student = TinyNet(DS, C, seed=5)
    return method(student, b, s), student


@pytest.mark.parametrize("scores", ["matmul", "gather"])
def test_loss_z_and_memory_update_match_reference_over_two_steps(scores):
    method = tiny({"beta": 0.8, "gamma": 0.0, "nce_m": 0.3, "scores": scores})
    teacher = method.teacher.model
    assert torch.all(method.z_s < 0) and torch.all(method.z_t < 0)
    student = TinyNet(DS, C, seed=5)
    z_ref = None
    for t, index in enumerate(([0, 4, 8, 1], [2, 3, 7, 10])):
        b, s = batch(index, seed=t), step(seed=t)
        idx = same_draw(method, b, s)
        mem_s, mem_t = method.memory_s.clone(), method.memory_t.clone()
        losses = method(student, b, s)
        hs, ht = student.pooled[-1].detach().double().requires_grad_(), teacher.pooled[-1].double()
        ref, z_ref_now, gs, gt = reference(method, idx, hs, ht, mem_s, mem_t, z_ref)
        z_ref = z_ref_now if z_ref is None else z_ref  # fixed at step 1
        assert set(losses) == {"ce", "crd"}
        assert math.isclose(losses["crd"].item(), ref.item(), rel_tol=1e-5)
        assert math.isclose(method.z_s.item(), float(z_ref[0]), rel_tol=1e-5)
        assert math.isclose(method.z_t.item(), float(z_ref[1]), rel_tol=1e-5)
        # gradient w.r.t. the student's pooled vector equals the reference's
        losses["crd"].backward()
        ref.backward()
        torch.testing.assert_close(student.pooled[-1].grad.double(), hs.grad, rtol=1e-4, atol=1e-7)
        # banks: the batch rows moved by momentum + renormalisation, every other row untouched
        torch.testing.assert_close(method.memory_s.double(), updated(mem_s, b.index, gs, 0.3), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(method.memory_t.double(), updated(mem_t, b.index, gt, 0.3), rtol=1e-5, atol=1e-6)
        rest = torch.ones(N, dtype=torch.bool)
        rest[b.index] = False
        assert torch.equal(method.memory_s[rest], mem_s[rest]) and torch.equal(method.memory_t[rest], mem_t[rest])
        assert torch.allclose(method.memory_s[b.index].norm(dim=1), torch.ones(B))
        assert idx[:, 0].tolist() == list(index)  # exact mode: the positive is the anchor itself
        method.zero_grad()
    assert ref.item() > 0


def test_head_gradients_match_reference_and_reach_both_heads():
    """v (student-anchored) reaches the student and W_s; u (teacher-anchored) reaches W_t only."""
    method = tiny({"gamma": 0.0})
    student = TinyNet(DS, C, seed=5)
    b, s = batch([0, 4, 8, 1]), step()
    idx = same_draw(method, b, s)
    mem_s, mem_t = method.memory_s.clone(), method.memory_t.clone()
    method(student, b, s)["crd"].backward()
    hs, ht = student.pooled[-1].detach().double(), method.teacher.model.pooled[-1].double()
    ref_params = {n: p.detach().double().requires_grad_() for n, p in method.named_parameters()}
    probe = tiny({"gamma": 0.0})  # same config; its heads are replaced by the float64 reference weights
    for n, p in ref_params.items():
        mod, attr = n.split(".")
        delattr(getattr(probe, mod), attr)
        setattr(getattr(probe, mod), attr, p)
    ref, _, _, _ = reference(probe, idx, hs, ht, mem_s, mem_t)
    ref.backward()
    for n, p in method.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
        torch.testing.assert_close(p.grad.double(), ref_params[n].grad, rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in method.teacher.model.parameters())


def test_kd_term_only_with_alpha_and_ce_weight():
    method = tiny({"alpha": 0.9, "gamma": 0.1, "T": 4.0})
    student = TinyNet(DS, C, seed=5)
    b = batch([0, 1, 2, 3])
    losses = method(student, b, step())
    zs, zt = student.classifier(student.pooled[-1]).double(), method.teacher.model.classifier(
        method.teacher.model.pooled[-1]).double()
    ce = -torch.log_softmax(zs, 1)[torch.arange(B), b.y].mean()
    pt, ps = torch.softmax(zt / 4, 1), torch.softmax(zs / 4, 1)
    kd = 16 * (pt * (pt.log() - ps.log())).sum(1).mean()
    assert set(losses) == {"ce", "kd", "crd"}
    assert math.isclose(losses["ce"].item(), 0.1 * ce.item(), rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), 0.9 * kd.item(), rel_tol=1e-4)


def check_rows(neg, cls, labels):
    assert (labels[neg] != cls[:, None]).all(), "a negative of the anchor's own class"


@pytest.mark.parametrize("k", [1, 150, 466])  # 466 = the smallest pool: all of it
def test_negatives_other_class_distinct_and_uniform(k):
    labels = torch.randint(0, 5, (600,), generator=torch.Generator().manual_seed(0))
    table = ClassTable.from_labels(labels, 5)
    assert k <= table.pool_min
    cls = torch.arange(400) % 5
    neg = draw_negatives(cls, k, table, torch.Generator().manual_seed(1))
    assert neg.shape == (400, k)
    check_rows(neg, cls, labels)
    srt = neg.sort(1).values
    assert (srt[:, 1:] != srt[:, :-1]).all(), "duplicate negative in a row"
    # uniform over the pool: over many class-0 rows, every other-class index is drawn k/pool of the time
    rows = 3000
    neg = draw_negatives(torch.zeros(rows, dtype=torch.long), k, table, torch.Generator().manual_seed(2))
    freq = torch.bincount(neg.flatten(), minlength=600).double() / rows
    pool = labels != 0
    p = k / pool.sum().item()
    assert freq[~pool].sum() == 0
    assert (freq[pool] - p).abs().max() <= 5 * math.sqrt(p * (1 - p) / rows) + 1e-12


def test_negatives_with_replacement_when_k_exceeds_the_pool():
    labels = torch.tensor([0] * 50 + [1] * 10 + [2] * 5)  # pools: 15, 55, 60
    table = ClassTable.from_labels(labels, 3)
    g = torch.Generator().manual_seed(0)
    cls = torch.tensor([0, 1, 2] * 20)
    for k in (40, 70):  # 40: mixed (class 0 needs replacement); 70: every class does (k > N too)
        neg = draw_negatives(cls, k, table, g)
        assert neg.shape == (60, k)
        check_rows(neg, cls, labels)
        for c in range(3):
            rows = neg[cls == c]
            pool = int((labels != c).sum())
            if pool >= k:
                srt = rows.sort(1).values
                assert (srt[:, 1:] != srt[:, :-1]).all()
            else:  # with replacement, covering the pool
                assert set(rows.flatten().tolist()) == set((labels != c).nonzero().flatten().tolist())


def test_relax_mode_positive_is_same_class():
    method = tiny({"mode": "relax", "nce_k": 8})
    index = torch.arange(N).repeat(10)
    idx = method.contrast_indices(index, torch.Generator().manual_seed(0))
    assert (LABELS[idx[:, 0]] == LABELS[index]).all()
    assert (idx[:, 0] != index).any()  # a random same-class sample, not always itself
    check_rows(idx[:, 1:], LABELS[index], LABELS)


def test_teacher_frozen_heads_trained_bn_untouched():
    torch.manual_seed(0)
    student, teacher_net = build_model("resnet8", 4), build_model("resnet8x4", 4)
    teacher = FrozenTeacher(teacher_net)
    before = snapshot(teacher_net)
    labels = torch.arange(32) % 4
    setup = with_labels(labels, model="resnet8", num_classes=4, image_size=32, train_size=32, epochs=2, batch_size=8,
                        family="cifar_resnet", stage_channels=tuple(student.stage_channels),
                        num_features=student.num_features, teacher=teacher)
    method = CRD(CRD.resolve_config("resnet8", {"nce_k": 16}), setup)
    assert CRD.needs_teacher
    assert method.embed_t.in_features == teacher_net.num_features == 256 and method.embed_s.in_features == 64
    names = {n for n, _ in method.named_parameters()}
    assert names == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}
    teacher_ids = {id(p) for p in teacher_net.parameters()}
    assert not teacher_ids & {id(p) for p in method.parameters()}
    assert not any(k.startswith("teacher") for k in method.state_dict())
    heads = {n: p.detach().clone() for n, p in method.named_parameters()}
    opt = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4)
    student.train()
    method.train()
    g = torch.Generator().manual_seed(0)
    for t in range(2):
        index = torch.arange(8) + 8 * t
        b = Batch(x=torch.randn(8, 3, 16, 16, generator=g), y=labels[index], index=index)
        loss = sum(method(student, b, step(t)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_teacher_untouched(teacher_net, before)  # weights and BN running statistics
    for n, p in method.named_parameters():
        assert not torch.equal(p, heads[n]), n  # both heads were optimised


def test_autocast_bf16_keeps_contrast_in_fp32():
    method = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses, _ = run_step(method, batch([0, 1, 2, 3]), step())
    assert losses["crd"].dtype == torch.float32 and torch.isfinite(losses["crd"])
    assert method.memory_s.dtype == method.memory_t.dtype == torch.float32


def test_state_dict_round_trip_and_exact_continuation():
    method = tiny()
    student = TinyNet(DS, C, seed=5)
    for t, index in enumerate(([0, 4, 8, 1], [2, 3, 7, 10])):
        method(student, batch(index, seed=t), step(t))
    state = method.state_dict()
    assert {"memory_s", "memory_t", "z_s", "z_t"} <= set(state)
    assert not any(k.startswith("_") for k in state)  # label tables are rebuilt from the data
    fresh = tiny(seed=123, teacher=method.teacher)
    assert not torch.equal(fresh.memory_s, method.memory_s)
    fresh.load_state_dict(state)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, state[k]), k
    a = method(student, batch([5, 6, 9, 11], seed=7), step(7))
    b = fresh(student, batch([5, 6, 9, 11], seed=7), step(7))
    assert torch.equal(a["crd"], b["crd"])  # Z is not re-fixed after loading
    assert torch.equal(method.memory_s, fresh.memory_s) and torch.equal(method.memory_t, fresh.memory_t)


def test_config_defaults_and_refusals():
    cfg = CRD.resolve_config("resnet18", {})
    assert (cfg.gamma, cfg.alpha, cfg.beta, cfg.feat_dim, cfg.nce_k, cfg.nce_t, cfg.nce_m, cfg.mode, cfg.scores) == (
        1.0, 0.0, 0.8, 128, 16384, 0.07, 0.5, "exact", "matmul")
    for bad in ({"mode": "loose"}, {"scores": "dense"}, {"nce_t": 0}, {"nce_m": 1.5}, {"nce_k": 0}, {"feat_dim": 0}, {"beta": -1}):
        with pytest.raises(ConfigError):
            CRD.resolve_config("resnet18", bad)
    fields = {"model": "resnet8", "num_classes": C, "image_size": 4, "train_size": N, "epochs": 2, "batch_size": B,
              "num_features": DS}
    cfg = CRD.resolve_config("resnet8", {})
    with pytest.raises(ConfigError, match="teacher"):
        CRD(cfg, with_labels(LABELS, **fields))
    teacher = FrozenTeacher(TinyNet(DT, C, seed=11))
    with pytest.raises(ConfigError, match="train_labels"):
        CRD(cfg, with_labels(None, **fields, teacher=teacher))
    with pytest.raises(ConfigError, match="train_labels"):
        CRD(cfg, with_labels(LABELS[:-1], **fields, teacher=teacher))
    with pytest.raises(ConfigError, match="2 classes"):
        CRD(cfg, with_labels(torch.zeros(N, dtype=torch.long), **fields, teacher=teacher))
    method = CRD(cfg, with_labels(LABELS, **fields, teacher=teacher))
    a = 1 / math.sqrt(128 / 3)
    assert method.memory_s.shape == (N, 128) and method.memory_s.abs().max() <= a
    assert method.memory_s.pow(2).sum(1).mean().item() == pytest.approx(1.0, abs=0.1)


# ---------------------------------------------------------------- DDP: one replicated bank on both ranks
SHARDS = [([0, 1, 2], [3, 4, 5]), ([0, 6, 7], [3, 8, 9]), ([1, 4, 6], [2, 5, 8])]  # step -> rank -> indices


def _ddp_worker(rank, port, out):
    from ipsd.engine import Task, wrap_ddp

    with gloo_group(rank, port):
        torch.set_num_threads(1)
        method = tiny()  # same seed on both ranks, as the engine seeds
        if rank == 1:
            method.memory_s.add_(1.0)  # a diverged start: the first step adopts rank 0's banks
        task = wrap_ddp(Task(TinyNet(DS, C, seed=5), method), torch.device("cpu"))
        opt = torch.optim.SGD(task.parameters(), lr=0.1)
        seen = []
        for t in range(3):
            index = torch.tensor(SHARDS[t][rank])  # disjoint per step, like the loader's rank shards
            seen.append(index)
            loss = sum(task(batch(index, seed=10 * t + rank), step(rank)).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.save({"memory_s": method.memory_s, "memory_t": method.memory_t, "z": (method.z_s, method.z_t),
                    "seen": torch.cat(seen)}, f"{out}/bank{rank}.pt")


def test_memory_banks_identical_on_two_ranks(tmp_path):
    spawn_two(_ddp_worker, str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"bank{r}.pt") for r in (0, 1))
    assert torch.equal(r0["memory_s"], r1["memory_s"]) and torch.equal(r0["memory_t"], r1["memory_t"])
    assert r0["z"] == r1["z"] and r0["z"][0] > 0
    init = tiny()  # rank 0's initial banks
    seen = torch.cat([r0["seen"], r1["seen"]])
    unseen = torch.ones(N, dtype=torch.bool)
    unseen[seen] = False
    assert torch.equal(r0["memory_s"][unseen], init.memory_s[unseen])  # rank 1's +1 offset was overwritten
    assert (r0["memory_s"][seen] != init.memory_s[seen]).all(1).all()  # both ranks' rows were updated
    assert torch.allclose(r0["memory_t"][seen].norm(dim=1), torch.ones(len(seen)))
