"""ipsd.mixing against hand computations: CutMix's box and its lambda, Cutout's hole, MixUp's convex combination,
the mixed-label CE, the Beta draws' moments, and randomness from the given generator only. The methods built on
them (cutmix, cutout, mixup, swap, ips_mix) are checked against hand-computed losses too."""
from __future__ import annotations

import math

import pytest
import torch
from helpers import LinearProbe, make_setup, make_step, pair_batch, ref_ce

from ipsd.config import ConfigError
from ipsd.method import Batch
from ipsd.mixing import Mix, beta, box_mask, cutmix_box, draw, draw_cutmix, draw_cutout, draw_mixup
from ipsd.patch_swap import apply_swap_loop, swap_cells
from ipsd.resolve import load_methods

METHODS = load_methods()
T = torch.tensor


def per_image_constants(b: int, size: int = 32) -> torch.Tensor:
    """Image i is filled with the value i + 1 (so every pixel says which image it came from)."""
    return (torch.arange(b, dtype=torch.float32) + 1).view(b, 1, 1, 1).expand(b, 3, size, size).clone()


# ------------------------------------------------------------------------------------------------ CutMix
@pytest.mark.parametrize("lam,cy,cx,box", [
    (0.75, 16, 16, (8, 24, 8, 24)),  # side int(32 * 0.5) = 16, half 8
    (0.75, 0, 0, (0, 8, 0, 8)),  # clipped at the top-left corner
    (0.5, 30, 5, (19, 32, 0, 16)),  # side int(32 * 0.7071) = 22, half 11: rows 19..41 -> 19..32, cols -6..16 -> 0..16
    (1.0, 7, 9, (7, 7, 9, 9)),  # lambda 1: an empty box
])
def test_cutmix_box_by_hand(lam, cy, cx, box):
    got = cutmix_box(32, 32, T(lam), T(cy), T(cx))
    assert tuple(int(v) for v in got) == box
    mask = box_mask(32, 32, *got)
    area = (box[1] - box[0]) * (box[3] - box[2])
    assert int(mask.sum()) == area
    assert bool(mask[0, 0, box[0]:box[1], box[2]:box[3]].all()) if area else True


def test_cutmix_draw_lambda_is_the_share_of_own_pixels_and_the_box_comes_from_the_partner():
    g = torch.Generator().manual_seed(5)
    x = per_image_constants(6)
    for _ in range(20):
        mix = draw_cutmix(x.shape, g, alpha=1.0, prob=1.0)
        out = mix.apply(x)
        from_partner = out != x  # pixels whose value changed came from another image
        moved = mix.perm != torch.arange(6)
        box = int(mix.mask.sum())  # one box for the whole batch (empty when lambda is close to 1)
        assert from_partner[moved].all(dim=1).sum(dim=(1, 2)).eq(box).all()  # exactly the box, in every channel
        assert not from_partner[~moved].any()
        assert torch.equal(out[:, :, mix.mask[0, 0]], (mix.perm + 1).float().view(6, 1, 1).expand(6, 3, box))
        assert math.isclose(float(mix.lam), 1 - box / 1024, rel_tol=1e-6)


def test_cutmix_at_probability_zero_changes_nothing():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    mix = draw_cutmix(x.shape, g, prob=0.0)
    assert torch.equal(mix.apply(x), x) and float(mix.lam) == 1.0


# ------------------------------------------------------------------------------------------------ Cutout
def test_cutout_zeroes_exactly_the_box_by_hand():
    # size 8 centred at (0, 5): rows clip(0 - 4) .. clip(0 + 4) = 0..4, cols 1..9 -> 4 x 8 = 32 pixels
    mask = box_mask(32, 32, T([0]), T([4]), T([1]), T([9]))
    out = Mix("cutout", torch.ones(()), None, mask).apply(torch.ones(1, 3, 32, 32))
    zero = out[0] == 0
    assert int(zero.sum()) == 3 * 32
    assert bool(zero[:, 0:4, 1:9].all()) and int(zero[:, 4:, :].sum()) == 0 and int(zero[:, :, 9:].sum()) == 0


def test_drawn_cutout_holes_are_clipped_squares_of_the_given_side():
    g = torch.Generator().manual_seed(1)
    x = torch.ones(64, 3, 32, 32)
    out = draw_cutout(x.shape, g, size=8).apply(x)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])  # the same hole in every channel
    for img in out[:, 0]:
        rows, cols = torch.nonzero(img == 0, as_tuple=True)
        top, bottom, left, right = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
        assert len(rows) == (bottom - top) * (right - left)  # one axis-aligned rectangle
        assert bottom - top <= 8 and right - left <= 8
        if top > 0 and bottom < 32:  # not clipped vertically: the full side
            assert bottom - top == 8
        if left > 0 and right < 32:
            assert right - left == 8
    cutout = draw_cutout(x.shape, torch.Generator().manual_seed(1), size=8)
    assert cutout.perm is None and float(cutout.lam) == 1.0  # labels untouched


# ------------------------------------------------------------------------------------------------- MixUp
def test_mixup_is_the_convex_combination_by_hand():
    x = per_image_constants(3, size=2)
    out = Mix("mixup", torch.tensor(0.3), torch.tensor([1, 2, 0])).apply(x)
    want = [0.3 * 1 + 0.7 * 2, 0.3 * 2 + 0.7 * 3, 0.3 * 3 + 0.7 * 1]
    for i, w in enumerate(want):
        assert torch.allclose(out[i], torch.full((3, 2, 2), w))


def test_drawn_mixup_uses_one_lambda_and_a_permutation():
    x = torch.randn(5, 3, 4, 4)
    mix = draw_mixup(x.shape, torch.Generator().manual_seed(2))
    assert sorted(mix.perm.tolist()) == list(range(5)) and 0 < float(mix.lam) < 1
    lam = float(mix.lam)
    torch.testing.assert_close(mix.apply(x), lam * x + (1 - lam) * x[mix.perm])


def test_mixed_label_ce_by_hand():
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])
    mix = Mix("mixup", torch.tensor(0.25), torch.tensor([1, 0]))

    def ce_row(row, label):  # -log softmax(row)[label]
        return math.log(sum(math.exp(v) for v in row)) - row[label]

    own = (ce_row([2, 0, 0], 0) + ce_row([0, 1, 0], 1)) / 2
    other = (ce_row([2, 0, 0], 1) + ce_row([0, 1, 0], 0)) / 2
    assert math.isclose(float(mix.ce(z, y)), 0.25 * own + 0.75 * other, rel_tol=1e-6)
    # the same as CE against the mixed one-hot target
    target = 0.25 * torch.eye(3)[y] + 0.75 * torch.eye(3)[y[mix.perm]]
    soft = -(target * torch.log_softmax(z, 1)).sum(1).mean()
    assert math.isclose(float(mix.ce(z, y)), float(soft), rel_tol=1e-6)


# ------------------------------------------------------------------------------------------ randomness
@pytest.mark.parametrize("alpha", [1.0, 0.4, 2.0])
def test_beta_draws_have_the_beta_moments(alpha):
    g = torch.Generator().manual_seed(11)
    xs = torch.stack([beta(alpha, g) for _ in range(20000)]).double()
    var = 1 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert ((xs >= 0) & (xs <= 1)).all()  # (float32 rounds draws within 1e-8 of an end onto it)
    assert abs(float(xs.mean()) - 0.5) < 4 * math.sqrt(var / len(xs))
    assert abs(float(xs.var()) - var) < 0.05 * var


@pytest.mark.parametrize("kind", ["cutmix", "cutout", "mixup"])
def test_draws_come_from_the_given_generator_only(kind):
    before = torch.get_rng_state()
    a = draw(kind, (8, 3, 32, 32), torch.Generator().manual_seed(3), alpha=1.0, prob=1.0, size=8)
    b = draw(kind, (8, 3, 32, 32), torch.Generator().manual_seed(3), alpha=1.0, prob=1.0, size=8)
    assert torch.equal(torch.get_rng_state(), before)  # the global stream is untouched
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(a.apply(x), b.apply(x)) and torch.equal(a.lam, b.lam)


# ------------------------------------------------------------------------------------------------ methods
def build(name, args=None, setup=None):
    cls = METHODS.get(name)
    return cls(cls.resolve_config("resnet18", args or {}), setup or make_setup())


def test_swap_loss_is_ce_on_the_first_swapped_view_by_hand():
    method = build("swap", {"pr_schedule": "constant", "p_r": 1.0})
    model, batch = LinearProbe(scale=0.02), pair_batch(b=4)
    losses = method(model, batch, make_step(seed=3))
    cells = swap_cells(4, 4, 1.0, torch.Generator().manual_seed(3))  # the swap's draws from the step's generator
    xa, _ = apply_swap_loop(batch.x, batch.partner, cells, 4)  # the per-sample reference loop
    z = xa.flatten(1).double() @ model.w.detach().double()
    assert len(model.inputs) == 1 and torch.equal(model.inputs[0], xa)  # one forward: the swapped anchor only
    assert set(losses) == {"ce"}
    assert math.isclose(losses["ce"].item(), float(ref_ce(z, batch.y)), rel_tol=1e-5)


def test_swap_takes_ips_swap_settings_and_no_loss_weights():
    cfg = METHODS.get("swap").resolve_config("resnet50", {})  # IPS's resnet50 gamma/alpha do not apply
    ips = METHODS.get("ips").resolve_config("resnet50", {})
    assert {k: getattr(cfg, k) for k in ("grid", "p_r", "pr_schedule", "k_mode", "self_pairs")} == \
        {k: getattr(ips, k) for k in ("grid", "p_r", "pr_schedule", "k_mode", "self_pairs")}
    with pytest.raises(ConfigError, match="unknown key 'method_args.alpha'"):
        METHODS.get("swap").resolve_config("resnet18", {"alpha": 1.0})


def test_cutmix_method_loss_by_hand():
    method = build("cutmix", {"prob": 1.0})
    model, batch = LinearProbe(scale=0.02), pair_batch(b=6)
    losses = method(model, batch, make_step(seed=4))
    mix = draw_cutmix(batch.x.shape, torch.Generator().manual_seed(4), 1.0, 1.0)  # the same draw
    x = torch.where(mix.mask, batch.x[mix.perm], batch.x)
    assert torch.equal(model.inputs[0], x) and 0 < int(mix.mask.sum()) < 1024
    z = x.flatten(1).double() @ model.w.detach().double()
    lam = 1 - int(mix.mask.sum()) / 1024
    want = lam * ref_ce(z, batch.y) + (1 - lam) * ref_ce(z, batch.y[mix.perm])
    assert math.isclose(losses["ce"].item(), float(want), rel_tol=1e-5)


def test_cutout_method_keeps_the_labels():
    method = build("cutout", {"size": 16})
    model, batch = LinearProbe(scale=0.02), pair_batch(b=4)
    losses = method(model, batch, make_step(seed=2))
    x = model.inputs[0]
    assert int((x == 0).sum()) > 0
    z = x.flatten(1).double() @ model.w.detach().double()
    assert math.isclose(losses["ce"].item(), float(ref_ce(z, batch.y)), rel_tol=1e-5)


def test_ips_mix_without_mixing_is_ips_exactly():
    """CutMix at probability 0 mixes nothing: the same loss terms as IPS from the same generator."""
    args = {"pr_schedule": "constant", "p_r": 0.5}
    batch = pair_batch(b=6)
    ips = build("ips", args)(LinearProbe(scale=0.02), batch, make_step(seed=9))
    mixed = build("ips_mix", {**args, "mix": "cutmix", "cutmix_prob": 0.0})(LinearProbe(scale=0.02), batch,
                                                                              make_step(seed=9))
    assert ips.keys() == mixed.keys() == {"ce", "kd"}
    for k in ips:
        assert torch.equal(ips[k], mixed[k]), k


def test_ips_mix_mixup_loss_by_hand():
    """p_r = 0 (no swap): both views mixed with one shared permutation and lambda; each view's CE is the mixed-label
    CE, weighted 0.5 * gamma; the KD term is IPS's between the two mixed views."""
    method = build("ips_mix", {"pr_schedule": "constant", "p_r": 0.0, "mix": "mixup", "gamma": 0.7, "alpha": 0.3})
    model, batch = LinearProbe(scale=0.02), pair_batch(b=5)
    losses = method(model, batch, make_step(seed=6))
    g = torch.Generator().manual_seed(6)
    swap_cells(5, 4, 0.0, g)  # the swap's draws come first (p_r = 0 swaps nothing)
    mix = draw_mixup(batch.x.shape, g, 1.0)
    lam, perm = float(mix.lam), mix.perm
    xa = lam * batch.x + (1 - lam) * batch.x[perm]
    xb = lam * batch.partner + (1 - lam) * batch.partner[perm]
    torch.testing.assert_close(model.inputs[0], xa)
    torch.testing.assert_close(model.inputs[1], xb)
    w = model.w.detach().double()
    za, zb = xa.flatten(1).double() @ w, xb.flatten(1).double() @ w
    y, yp = batch.y, batch.y[perm]
    ce_want = 0.5 * 0.7 * sum(lam * ref_ce(z, y) + (1 - lam) * ref_ce(z, yp) for z in (za, zb))
    from helpers import ref_kl

    kd_want = 0.5 * 0.3 * (ref_kl(za, zb, 4.0) + ref_kl(zb, za, 4.0))
    assert math.isclose(losses["ce"].item(), float(ce_want), rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), float(kd_want), rel_tol=1e-4)


def test_ips_mix_independent_draws_differ_per_view_and_before_swap_needs_shared():
    method = build("ips_mix", {"pr_schedule": "constant", "p_r": 0.0, "mix": "cutout", "mix_partner": "independent"})
    model = LinearProbe(scale=0.02)
    batch = pair_batch(b=4)
    same = Batch(x=batch.x, y=batch.y, index=batch.index, partner=batch.x.clone(), partner_index=batch.index)
    method(model, same, make_step(seed=1))
    assert not torch.equal(model.inputs[0] == 0, model.inputs[1] == 0)  # each view has its own holes
    shared = build("ips_mix", {"pr_schedule": "constant", "p_r": 0.0, "mix": "cutout"})
    model = LinearProbe(scale=0.02)
    shared(model, same, make_step(seed=1))
    assert torch.equal(model.inputs[0] == 0, model.inputs[1] == 0)
    with pytest.raises(ConfigError, match="mix_partner=independent needs mix_order=after_swap"):
        METHODS.get("ips_mix").resolve_config("resnet18", {"mix_order": "before_swap", "mix_partner": "independent"})
