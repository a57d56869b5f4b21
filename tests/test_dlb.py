"""DLB: first step CE only, loss vs an independent reference with the previous step's logits as the
target, detached targets, carried state (steps, epochs, unequal batch sizes, state_dict, DDP ranks)."""
import io
import math

import pytest
import torch
import torch.distributed as dist
from helpers import (
    LinearProbe,
    gloo_group,
    make_setup,
    make_step,
    ref_ce,
    ref_kl,
    spawn_two,
)

from ipsd.config import ConfigError
from ipsd.dist import DistInfo
from ipsd.engine import method_checkpoint, restore_method
from ipsd.method import Batch
from ipsd.resolve import load_methods

DLB = load_methods().get("dlb")
SETUP = make_setup()


class Probe(LinearProbe):
    """LinearProbe (every forward tracks gradients) that can take a stand-in optimiser step."""

    def __init__(self):
        super().__init__(always_grad=True)

    def perturb(self, seed):
        """Stand-in for an optimiser step between two iterations."""
        with torch.no_grad():
            self.w += 0.05 * torch.randn(self.w.shape, generator=torch.Generator().manual_seed(seed))


def make_batch(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(x=torch.randn(b, 3, 32, 32, generator=g), y=torch.randint(0, 5, (b,), generator=g),
                 index=torch.arange(b), view2=torch.randn(b, 3, 32, 32, generator=g))


def step(epoch=1):
    return make_step(epoch, seed=epoch)


def make(**args):
    return DLB(DLB.resolve_config("resnet18", args), SETUP)


def test_first_step_is_ce_only_and_stores_view2_labels_and_detached_logits():
    method, model, b1 = make(), Probe(), make_batch()
    losses = method(model, b1, step())
    assert len(model.inputs) == 1 and torch.equal(model.inputs[0], b1.x)
    assert losses["kd"].item() == 0.0
    assert math.isclose(losses["ce"].item(), ref_ce(model.outputs[0].detach().double(), b1.y).item(), rel_tol=1e-6)
    last = method.last
    assert torch.equal(last.x, b1.view2) and torch.equal(last.y, b1.y)
    assert torch.equal(last.z, model.outputs[0].detach())
    assert last.z.grad_fn is None and not last.z.requires_grad


@pytest.mark.parametrize("T,alpha", [(3.0, 1.0), (2.0, 0.5), (5.0, 2.0)])
def test_second_step_loss_equals_reference_with_the_previous_parameters_logits(T, alpha):
    method, model = make(T=T, alpha=alpha), Probe()
    b1, b2 = make_batch(4, 1), make_batch(4, 2)
    method(model, b1, step())
    z1_old = model.outputs[0].detach().double()  # view 0 of b1 under the parameters of step 1
    model.perturb(7)
    losses = method(model, b2, step())
    # official order: the current batch's view 0, then the previous batch's view 1, in two calls
    assert torch.equal(model.inputs[1], b2.x) and torch.equal(model.inputs[2], b1.view2)
    z2, z1_tilde = model.outputs[1].detach().double(), model.outputs[2].detach().double()
    ce = ref_ce(torch.cat([z1_tilde, z2]), torch.cat([b1.y, b2.y]))
    kd = alpha * ref_kl(z1_old, z1_tilde, T)
    assert kd > 1e-3
    assert math.isclose(losses["ce"].item(), ce.item(), rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), kd.item(), rel_tol=1e-4)
    # with the current parameters the target would differ: the stored logits are really the old ones
    assert not math.isclose(kd.item(), alpha * ref_kl(b1.x.flatten(1).double() @ model.w.detach().double(),
                                                      z1_tilde, T).item(), rel_tol=1e-3)


def test_target_is_detached():
    """d kd / d z~ = alpha T (softmax(z~/T) - softmax(z_old/T)) / B and nothing reaches the stored logits."""
    T, alpha = 3.0, 2.0
    method, model = make(T=T, alpha=alpha), Probe()
    method(model, make_batch(4, 1), step())
    z_old = method.last.z.clone()
    model.perturb(3)
    losses = method(model, make_batch(4, 2), step())
    losses["kd"].backward()
    z_tilde = model.outputs[2]
    expected = alpha * T * (torch.softmax(z_tilde.detach() / T, 1) - torch.softmax(z_old / T, 1)) / 4
    torch.testing.assert_close(z_tilde.grad, expected)
    assert model.outputs[1].grad is None or model.outputs[1].grad.abs().sum() == 0  # current batch: CE only


def test_unequal_consecutive_batch_sizes_and_epoch_boundary():
    method, model = make(), Probe()
    b1, b2, b3 = make_batch(4, 1), make_batch(3, 2), make_batch(4, 3)
    method(model, b1, step(1))
    losses = method(model, b2, step(1))  # last, smaller batch of epoch 1
    z_tilde, z2 = model.outputs[2].detach().double(), model.outputs[1].detach().double()
    assert math.isclose(losses["ce"].item(), ref_ce(torch.cat([z_tilde, z2]), torch.cat([b1.y, b2.y])).item(),
                        rel_tol=1e-5)
    method.epoch_end(step(1))
    method.epoch_start(step(2))
    assert torch.equal(method.last.x, b2.view2) and len(method.last.y) == 3
    z_prev = method.last.z.double()
    losses = method(model, b3, step(2))  # first step of epoch 2 distils the last batch of epoch 1
    assert torch.equal(model.inputs[4], b2.view2)
    z_tilde = model.outputs[4].detach().double()
    assert math.isclose(losses["kd"].item(), ref_kl(z_prev, z_tilde, 3.0).item(), rel_tol=1e-4)
    assert len(method.last.y) == 4


@pytest.mark.parametrize("form", ["code", "paper"])
def test_state_dict_round_trip_continues_identically(form):
    model = Probe()
    method = make(form=form)
    for s in (1, 2):
        method(model, make_batch(4, s), step())
    buf = io.BytesIO()
    torch.save(method.state_dict(), buf)
    buf.seek(0)
    fresh = make(form=form)
    fresh.load_state_dict(torch.load(buf))
    assert torch.equal(fresh.last.x, method.last.x) and torch.equal(fresh.last.z, method.last.z)
    b3 = make_batch(4, 3)
    a = method(model, b3, step())
    b = fresh(model, b3, step())
    assert a["kd"] > 0
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a checkpoint taken before any step restores "no previous batch"
    empty = make(form=form)
    empty.load_state_dict(make(form=form).state_dict())
    assert empty.last is None and empty(model, b3, step())["kd"].item() == 0.0


def test_paper_form_is_one_call_over_carried_then_fresh_half():
    method, model = make(form="paper"), Probe()
    b1, b2 = make_batch(4, 1), make_batch(3, 2)
    method(model, b1, step())
    z_old = model.outputs[0].detach().double()
    model.perturb(5)
    losses = method(model, b2, step())
    assert len(model.inputs) == 2 and torch.equal(model.inputs[1], torch.cat([b1.view2, b2.x]))
    z = model.outputs[1].detach().double()
    assert math.isclose(losses["ce"].item(), ref_ce(z, torch.cat([b1.y, b2.y])).item(), rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), ref_kl(z_old, z[:4], 3.0).item(), rel_tol=1e-4)
    torch.testing.assert_close(method.last.z.double(), z[4:])
    assert torch.equal(method.last.x, b2.view2)


def test_config_defaults_and_refusals():
    cfg = DLB.resolve_config("resnet18", {})
    assert (cfg.T, cfg.alpha, cfg.form) == (3.0, 1.0, "code")
    assert make().needs.views == 2
    with pytest.raises(ConfigError, match="form='half'"):
        DLB.resolve_config("resnet18", {"form": "half"})
    with pytest.raises(ConfigError, match="T=0"):
        DLB.resolve_config("resnet18", {"T": 0})
    with pytest.raises(ConfigError, match="alpha=-1"):
        DLB.resolve_config("resnet18", {"alpha": -1})


def _ddp_worker(rank, port, path):
    with gloo_group(rank, port):
        method, model = make(), Probe()
        batch = make_batch(3 - rank, 10 + rank)  # ranks hold different (and differently sized) batches
        method(model, batch, step())
        part = method_checkpoint(method, DistInfo(rank, 2))  # what the engine saves (collective)
        if rank == 0:
            torch.save(part, path)
        dist.barrier()
        fresh = make()
        restore_method(fresh, torch.load(path), rank)
        assert torch.equal(fresh.last.x, batch.view2) and torch.equal(fresh.last.y, batch.y)
        assert torch.equal(fresh.last.z, method.last.z)


def test_ddp_checkpoint_restores_each_ranks_own_previous_batch(tmp_path):
    spawn_two(_ddp_worker, str(tmp_path / "m.pt"))
