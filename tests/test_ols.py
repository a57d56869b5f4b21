"""OLS: loss against an independent reference, the soft-label matrix after an epoch of hand-made
logits, gradients, checkpoint round trip, defaults, and the DDP all-reduce of the statistics."""
import math

import pytest
import torch
from helpers import Logits, gloo_group, make_setup, make_step, ref_log_softmax, softmax_list, spawn_two

from ipsd.config import ConfigError
from ipsd.method import Batch
from ipsd.resolve import load_methods

OLS = load_methods().get("ols")
C = 3
SETUP = make_setup(classes=C, train_size=20)


def batch_for(y):
    return Batch(x=torch.zeros(len(y), 3, 4, 4), y=torch.tensor(y), index=torch.arange(len(y)))


def step(epoch=2):
    return make_step(epoch)


def new(**args):
    return OLS(OLS.resolve_config("resnet18", args), SETUP)


def reference(z, y, S, alpha):
    """(1 - alpha) * mean CE + alpha * mean_i(-sum_k S[y_i, k] log softmax(z_i)_k), in float64."""
    z, S = torch.tensor(z, dtype=torch.float64), torch.tensor(S, dtype=torch.float64)
    logp = ref_log_softmax(z)
    ce = -sum(logp[i, y[i]] for i in range(len(y))) / len(y)
    soft = -sum((S[y[i]] * logp[i]).sum() for i in range(len(y))) / len(y)
    return (1 - alpha) * ce.item(), alpha * soft.item()


Z = [[2.0, 0.5, -1.0], [0.1, 1.5, 0.3], [0.2, 0.1, 0.9], [1.0, 3.0, -0.5]]
Y = [0, 1, 2, 0]  # samples 0-2 correct, sample 3 wrong
S_SET = [[0.7, 0.2, 0.1], [0.05, 0.9, 0.05], [0.3, 0.3, 0.4]]


@pytest.mark.parametrize("alpha", [0.5, 0.2])
def test_loss_equals_reference(alpha):
    method = new(alpha=alpha)
    method.soft_labels.copy_(torch.tensor(S_SET))
    losses = method(Logits(Z), batch_for(Y), step())
    ref_ce, ref_soft = reference(Z, Y, S_SET, alpha)
    assert math.isclose(losses["ce"].item(), ref_ce, rel_tol=1e-5)
    assert math.isclose(losses["soft"].item(), ref_soft, rel_tol=1e-5)


def test_first_epoch_is_half_ce_because_the_matrix_starts_at_zero():
    method = new()
    assert torch.equal(method.soft_labels, torch.zeros(C, C))
    method.epoch_start(step(1))
    losses = method(Logits(Z), batch_for(Y), step(1))
    ref_ce, _ = reference(Z, Y, S_SET, 0.5)
    assert losses["soft"].item() == 0.0
    assert math.isclose(sum(losses.values()).item(), ref_ce, rel_tol=1e-5)


def test_matrix_after_an_epoch_is_the_mean_of_correct_samples_with_uniform_fallback():
    method = new()
    method.epoch_start(step(1))
    b1 = [[3.0, 0.0, 1.0], [0.0, 2.0, 0.5]]  # class 0 correct, class 1 correct
    b2 = [[1.0, 0.2, -1.0], [0.5, 0.1, 0.2], [4.0, 0.0, 0.0]]  # class 0 correct, class 2 wrong, class 1 wrong
    method(Logits(b1), batch_for([0, 1]), step(1))
    method(Logits(b2), batch_for([0, 2, 1]), step(1))
    method.epoch_end(step(1))
    p = [softmax_list(r) for r in b1 + b2]
    expect = torch.tensor([
        [(p[0][k] + p[2][k]) / 2 for k in range(C)],  # two correct class-0 samples
        p[1],  # the one correct class-1 sample (the wrong one, p[4], is left out)
        [1 / C] * C,  # no correct class-2 sample: uniform
    ])
    torch.testing.assert_close(method.soft_labels, expect, rtol=1e-6, atol=1e-7)
    assert method.log_values(step(1))["ols_classes_seen"] == pytest.approx(2 / 3)
    # the next epoch starts fresh statistics but keeps training against the matrix just built
    method.epoch_start(step(2))
    assert method.counts.sum() == 0 and method.sums.abs().sum() == 0
    losses = method(Logits(Z), batch_for(Y), step(2))
    assert math.isclose(losses["soft"].item(), reference(Z, Y, expect.tolist(), 0.5)[1], rel_tol=1e-5)


def test_no_smoothing_across_epochs():
    method = new()
    for e, (z, y) in enumerate([([[3.0, 0.0, 0.0]], [0]), ([[0.0, 1.0, 0.0]], [1])], 1):
        method.epoch_start(step(e))
        method(Logits(z), batch_for(y), step(e))
        method.epoch_end(step(e))
    # epoch 2 saw no correct class-0 sample: class 0 falls back to uniform, it does not keep epoch 1's row
    torch.testing.assert_close(method.soft_labels[0], torch.full((C,), 1 / C))
    torch.testing.assert_close(method.soft_labels[1], torch.tensor(softmax_list([0.0, 1.0, 0.0])))


def test_gradient_is_ce_plus_soft_target_gradient_and_matrix_gets_none():
    method = new()
    method.soft_labels.copy_(torch.tensor(S_SET))
    model = Logits(Z)
    sum(method(model, batch_for(Y), step()).values()).backward()
    z, S = torch.tensor(Z, dtype=torch.float64), torch.tensor(S_SET, dtype=torch.float64)
    p = torch.exp(z) / torch.exp(z).sum(1, keepdim=True)
    onehot = torch.eye(C, dtype=torch.float64)[Y]
    target = S[Y]
    # d/dz of -sum_k t_k log p_k = p * sum(t) - t; mean over the batch
    expect = (0.5 * (p - onehot) + 0.5 * (p * target.sum(1, keepdim=True) - target)) / len(Y)
    torch.testing.assert_close(model.z.grad.double(), expect, rtol=1e-5, atol=1e-7)
    assert not method.soft_labels.requires_grad and list(method.parameters()) == []


def test_state_dict_round_trip():
    method = new()
    method.epoch_start(step(1))
    method(Logits(Z), batch_for(Y), step(1))
    method.epoch_end(step(1))
    fresh = new()
    fresh.load_state_dict(method.state_dict())
    for name in ("soft_labels", "sums", "counts"):
        assert torch.equal(getattr(fresh, name), getattr(method, name)), name
    assert set(method.state_dict()) == {"soft_labels", "sums", "counts"}
    a, b = method(Logits(Z), batch_for(Y), step()), fresh(Logits(Z), batch_for(Y), step())
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_defaults_and_refusals():
    assert OLS.resolve_config("resnet18", {}).alpha == 0.5
    assert OLS.resolve_config("shufflenetv2", {}).alpha == 0.5
    with pytest.raises(ConfigError, match=r"alpha=1.5 .*\[0, 1\]"):
        OLS.resolve_config("resnet18", {"alpha": 1.5})
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        OLS.resolve_config("resnet18", {"alpah": 0.3})


# --- DDP: statistics are summed over ranks before the matrix is updated --------------------------

RANK_LOGITS = ([[3.0, 0.0, 1.0], [0.0, 2.0, 0.5]], [[1.0, 0.2, -1.0], [0.0, 0.3, 0.1]])
RANK_Y = ([0, 1], [0, 2])


def _worker(rank, port, out):
    with gloo_group(rank, port):
        method = new()
        method.epoch_start(step(1))
        method(Logits(RANK_LOGITS[rank]), batch_for(RANK_Y[rank]), step(1))
        method.epoch_end(step(1))
        torch.save(method.soft_labels, f"{out}/S{rank}.pt")


def test_ddp_ranks_hold_the_matrix_of_the_union_of_their_batches(tmp_path):
    spawn_two(_worker, str(tmp_path))
    s0, s1 = (torch.load(tmp_path / f"S{r}.pt") for r in (0, 1))
    assert torch.equal(s0, s1)
    single = new()
    single.epoch_start(step(1))
    single(Logits(RANK_LOGITS[0] + RANK_LOGITS[1]), batch_for(RANK_Y[0] + RANK_Y[1]), step(1))
    single.epoch_end(step(1))
    torch.testing.assert_close(s0, single.soft_labels)
    assert not torch.equal(s0[0], torch.full((C,), 1 / C))  # class 0 had correct samples on both ranks
