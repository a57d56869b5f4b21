"""FER: loss against an independent reference, the memory update, sticky flags, the init epoch,
gradients, checkpoint round trip, defaults, and identical memory on both ranks under DDP."""
import math

import pytest
import torch
from helpers import Logits, gloo_group, make_setup, make_step, softmax_list, spawn_two

from ipsd.config import ConfigError
from ipsd.method import Batch
from ipsd.resolve import load_methods

FER = load_methods().get("fer")
C, N, E = 3, 10, 240
SETUP = make_setup(classes=C, train_size=N, epochs=E)


def batch_for(y, index):
    return Batch(x=torch.zeros(len(y), 3, 4, 4), y=torch.tensor(y), index=torch.tensor(index))


def step(epoch):
    return make_step(epoch, E)


def new(model="resnet18", **args):
    return FER(FER.resolve_config(model, args), SETUP)


def reference(z, y, memory, flags, e, T=5.0, gamma=0.1):
    """Spec b.7 written out per sample, in float64: (ce term, kd term)."""
    w_ce = gamma + (1 - e / E) * (1 - gamma)
    w_kd = (e / E) * (1 - gamma)
    ce = kd = 0.0
    for zi, yi, mi, fi in zip(z, y, memory, flags):
        ce_i = -math.log(softmax_list(zi)[yi])
        if fi:
            ce += w_ce * ce_i
            kd += w_kd * T * T * -sum(m * math.log(q) for m, q in zip(mi, softmax_list(zi, T)))
        else:
            ce += ce_i
    return ce / len(y), kd / len(y)


Z = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.2, 0.1, 0.9], [1.0, 3.0, -0.5]]
Y = [0, 1, 2, 0]  # samples 0-2 predicted correctly, sample 3 wrongly
IDX = [7, 2, 5, 0]
MEM = [[0.2, 0.3, 0.1], [0.0, 0.0, 0.0], [0.1, 0.1, 0.6], [0.5, 0.25, 0.25]]  # rows of IDX; may sum to < 1
FLAGS = [True, False, True, True]


def preset(method):
    method.memory[torch.tensor(IDX)] = torch.tensor(MEM)
    method.flags[torch.tensor(IDX)] = torch.tensor(FLAGS)


@pytest.mark.parametrize("e", [2, 120, 240])
def test_loss_equals_reference_with_memory_read_before_the_update(e):
    method = new()
    preset(method)
    losses = method(Logits(Z), batch_for(Y, IDX), step(e))
    ref_ce, ref_kd = reference(Z, Y, MEM, FLAGS, e)
    assert math.isclose(losses["ce"].item(), ref_ce, rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), ref_kd, rel_tol=1e-5)
    assert not torch.equal(method.memory[torch.tensor(IDX)], torch.tensor(MEM))  # ... and the memory moved after


def test_memory_update_formula_and_sticky_flags():
    method = new(mu=0.7)
    preset(method)
    method(Logits(Z), batch_for(Y, IDX), step(5))
    for i, (zi, yi, mi) in enumerate(zip(Z, Y, MEM)):
        p, pT = softmax_list(zi), softmax_list(zi, 5.0)
        if max(range(C), key=lambda k: zi[k]) == yi:
            w = 1 - math.exp(-0.7 * p[yi])
            expect = [(1 - w) * m + w * q for m, q in zip(mi, pT)]
        else:
            expect = mi  # wrongly predicted: memory untouched
        torch.testing.assert_close(method.memory[IDX[i]], torch.tensor(expect), rtol=1e-6, atol=1e-7)
    # sample 3 (index 0) was flagged before and is wrong now: its flag stays set; sample 1 got flagged now
    assert method.flags[torch.tensor(IDX)].tolist() == [True, True, True, True]
    assert method.flags.sum() == 4  # other samples untouched
    # a later step where every sample is wrong clears nothing
    wrong = [[-5.0, 1.0, 1.0], [1.0, -5.0, 1.0], [1.0, 1.0, -5.0], [-5.0, 1.0, 1.0]]
    before = method.memory.clone()
    method(Logits(wrong), batch_for(Y, IDX), step(6))
    assert method.flags.sum() == 4 and torch.equal(method.memory, before)


def test_init_epoch_is_plain_ce_and_fills_the_memory():
    method = new()
    losses = method(Logits(Z), batch_for(Y, IDX), step(1))
    ref_ce = sum(-math.log(softmax_list(z)[y]) for z, y in zip(Z, Y)) / len(Y)
    assert math.isclose(losses["ce"].item(), ref_ce, rel_tol=1e-5) and losses["kd"].item() == 0.0
    assert method.flags[torch.tensor(IDX)].tolist() == [True, True, True, False]  # e_init=1: updated in epoch 1
    p = softmax_list(Z[0])
    w = 1 - math.exp(-1.0 * p[0])
    torch.testing.assert_close(method.memory[7], torch.tensor([w * q for q in softmax_list(Z[0], 5.0)]))


def test_epochs_before_the_last_init_epoch_do_not_touch_the_memory():
    method = new(e_init=2)
    losses = method(Logits(Z), batch_for(Y, IDX), step(1))
    assert method.flags.sum() == 0 and method.memory.abs().sum() == 0
    preset(method)  # even with memory, epoch 2 (= e_init) is still plain CE ...
    losses = method(Logits(Z), batch_for(Y, IDX), step(2))
    ref_ce = sum(-math.log(softmax_list(z)[y]) for z, y in zip(Z, Y)) / len(Y)
    assert math.isclose(losses["ce"].item(), ref_ce, rel_tol=1e-5) and losses["kd"].item() == 0.0
    assert method.flags.sum() == 4  # ... but updates it


def test_gradient_of_unflagged_samples_is_plain_ce_and_memory_gets_none():
    method = new()
    preset(method)
    model = Logits(Z)
    sum(method(model, batch_for(Y, IDX), step(100)).values()).backward()
    z = torch.tensor(Z, dtype=torch.float64)
    p = torch.softmax(z, 1)
    onehot = torch.eye(C, dtype=torch.float64)[Y]
    torch.testing.assert_close(model.z.grad[1].double(), (p[1] - onehot[1]) / len(Y))  # unflagged
    # flagged: w_ce (p - onehot) + w_kd T^2 (q_T * sum(m) - m) / T, all over B
    w_ce, w_kd = 0.1 + (1 - 100 / E) * 0.9, 100 / E * 0.9
    m = torch.tensor(MEM[0], dtype=torch.float64)
    qT = torch.softmax(z[0] / 5, 0)
    expect = (w_ce * (p[0] - onehot[0]) + w_kd * 25 * (qT * m.sum() - m) / 5) / len(Y)
    torch.testing.assert_close(model.z.grad[0].double(), expect)
    assert list(method.parameters()) == [] and not method.memory.requires_grad


def test_state_dict_round_trip():
    method = new()
    method(Logits(Z), batch_for(Y, IDX), step(1))
    method(Logits(Z), batch_for(Y, [1, 3, 4, 6]), step(2))
    fresh = new()
    fresh.load_state_dict(method.state_dict())
    assert set(method.state_dict()) == {"memory", "flags"}
    assert torch.equal(fresh.memory, method.memory) and torch.equal(fresh.flags, method.flags)
    assert fresh.flags.dtype == torch.bool
    a, b = method(Logits(Z), batch_for(Y, IDX), step(3)), fresh(Logits(Z), batch_for(Y, IDX), step(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(fresh.memory, method.memory)


def test_defaults_per_model_and_refusals():
    cfg = FER.resolve_config("resnet18", {})
    assert (cfg.T, cfg.gamma, cfg.mu, cfg.e_init) == (5.0, 0.1, 1.0, 1)
    for model, mu in [("shufflenetv2", 0.5), ("shufflenetv1", 0.5), ("resnet50", 1.0), ("resnet8", 1.0),
                      ("vgg13", 1.0)]:
        assert FER.resolve_config(model, {}).mu == mu, model
    assert FER.resolve_config("shufflenetv2", {"mu": 0.3}).mu == 0.3
    with pytest.raises(ConfigError, match=r"mu=0.0 .*\(0, inf\]"):
        FER.resolve_config("resnet18", {"mu": 0.0})
    with pytest.raises(ConfigError, match=r"gamma=2.0 .*\[0, 1\]"):
        FER.resolve_config("resnet18", {"gamma": 2.0})
    with pytest.raises(ConfigError, match="e_init"):
        FER.resolve_config("resnet18", {"e_init": -1})


# --- DDP: each rank sees different indices; the memory must end up identical everywhere ----------

RANK_Z = ([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3]], [[0.2, 0.1, 0.9], [1.0, 3.0, -0.5]])
RANK_Y = ([0, 1], [2, 0])
RANK_IDX = ([7, 2], [5, 0])


def _worker(rank, port, out):
    with gloo_group(rank, port):
        method = new()
        method(Logits(RANK_Z[rank]), batch_for(RANK_Y[rank], RANK_IDX[rank]), step(1))
        torch.save(method.state_dict(), f"{out}/fer{rank}.pt")


def test_ddp_memory_identical_on_both_ranks(tmp_path):
    spawn_two(_worker, str(tmp_path))
    s0, s1 = (torch.load(tmp_path / f"fer{r}.pt") for r in (0, 1))
    assert torch.equal(s0["memory"], s1["memory"]) and torch.equal(s0["flags"], s1["flags"])
    # rank 0 holds rank 1's update (index 5) and vice versa (index 7)
    assert s0["memory"][5].abs().sum() > 0 and s1["memory"][7].abs().sum() > 0
    single = new()
    single(Logits(RANK_Z[0] + RANK_Z[1]), batch_for(RANK_Y[0] + RANK_Y[1], RANK_IDX[0] + RANK_IDX[1]), step(1))
    torch.testing.assert_close(s0["memory"], single.memory)
    assert torch.equal(s0["flags"], single.flags)
