"""The regression gate (ipsd/regress.py): its comparison rules on hand-made trajectories, the goldens on disk, the
gate over every entry on real CIFAR-10, and planted behaviour changes (benchmarks/regress_calibration.py) that it
must catch, naming the entry and the term, while a change without behavioural effect passes."""
from __future__ import annotations

import copy
import json
import math

import pytest

import ipsd.losses
from benchmarks.regress_calibration import PLANTS, kl_t2_explicit, rebound, reversed_sum
from ipsd import regress
from ipsd.cli import main
from ipsd.regress import ACCURACY_ATOL, GRAD_RTOL, LOSS_FLOOR, LOSS_RTOL, WEIGHTS_RTOL, compare


def hand_made(ce=(2.0, 1.5), top1=(10.0, 12.0), norm=3.0, sha="aa", kd=(0.0, 0.25), grad=0.5):
    """A two-step trajectory in the golden layout."""
    return {"entry": "x", "method": "hard", "method_args": {"T": 4.0},
            "series": {"loss.ce": list(ce), "loss.kd": list(kd), "top1": list(top1)}, "top1": top1[-1],
            "grad1": {"000:4x3": grad}, "state": {"sha256": sha, "norms": {"model.w": norm}}}


# ------------------------------------------------------------------------------------- comparison rules

def test_identical_trajectories_move_nothing():
    assert compare(hand_made(), hand_made()) == []


@pytest.mark.parametrize("factor, fails", [(0.5, False), (1.5, True)])
def test_a_loss_term_fails_beyond_its_relative_tolerance(factor, fails):
    moved = compare(hand_made(), hand_made(ce=(2.0, 1.5 * (1 + factor * LOSS_RTOL))))
    (m,) = moved
    assert (m.entry, m.quantity, m.step, m.golden) == ("x", "loss.ce", 2, 1.5)
    assert m.change == pytest.approx(factor * LOSS_RTOL, rel=1e-6)  # |1.5 (1 + f r) - 1.5| / 1.5 = f r
    assert m.failed is fails


def test_accuracies_compare_in_points():
    at_limit = compare(hand_made(), hand_made(top1=(10.0, 12.0 + ACCURACY_ATOL)))
    assert {m.quantity: m.failed for m in at_limit} == {"top1": False, "top1 (final)": False}
    beyond = compare(hand_made(), hand_made(top1=(10.0 + ACCURACY_ATOL + 1, 12.0)))
    (m,) = beyond
    assert (m.quantity, m.step, m.unit, m.change, m.failed) == ("top1", 1, "pt", ACCURACY_ATOL + 1, True)


def test_first_step_gradient_norms_are_compared_relatively():
    (m,) = compare(hand_made(), hand_made(grad=0.5 * (1 + 3 * GRAD_RTOL)))
    assert (m.quantity, m.step, m.failed) == ("grad1.000:4x3", 1, True) and m.change == pytest.approx(3 * GRAD_RTOL)
    now = hand_made()
    now["grad1"]["001:3"] = 0.1  # a parameter that got no gradient before gets one now
    (m,) = compare(hand_made(), now)
    assert m.quantity == "grad1.001:3" and math.isinf(m.change) and m.failed


def test_state_norms_are_compared_only_when_the_checksum_differs():
    assert compare(hand_made(), hand_made(norm=3.0 * (1 + 2 * WEIGHTS_RTOL))) == []  # same sha256: bit-identical
    (m,) = compare(hand_made(), hand_made(norm=3.0 * (1 + 2 * WEIGHTS_RTOL), sha="bb"))
    assert m.quantity == "state.model.w" and m.change == pytest.approx(2 * WEIGHTS_RTOL) and m.failed
    (m,) = compare(hand_made(), hand_made(sha="bb"))  # other bits, equal norms: shown, not failed
    assert m.quantity == "state (sha256 only)" and not m.failed


def test_a_negligible_loss_term_is_compared_relative_to_the_floor_and_a_missing_term_fails():
    floor = LOSS_FLOOR * (2.0 + 0.0)  # step 1: kd = 0 beside ce = 2
    for factor, fails in ((0.5, False), (2.0, True)):
        (m,) = compare(hand_made(), hand_made(kd=(factor * LOSS_RTOL * floor, 0.25)))
        assert (m.quantity, m.step, m.failed) == ("loss.kd", 1, fails)
        assert m.change == pytest.approx(factor * LOSS_RTOL)
    now = hand_made()
    del now["series"]["loss.kd"]
    (m,) = compare(hand_made(), now)
    assert m.quantity == "loss.kd" and math.isinf(m.change) and m.failed


def test_a_noisy_method_gets_its_multiplied_tolerances():
    (name, factor), *_ = regress.NOISY_METHODS.items()
    golden = {**hand_made(), "method": name}
    move = 1.5 * (1 + 0.5 * factor * LOSS_RTOL)  # half of its multiplied tolerance, `factor`/2 times the plain one
    (m,) = compare(golden, {**golden, "series": {**golden["series"], "loss.ce": [2.0, move]}})
    assert m.tolerance == factor * LOSS_RTOL and not m.failed
    (m,) = compare(hand_made(), hand_made(ce=(2.0, move)))
    assert m.tolerance == LOSS_RTOL and m.failed


def test_a_changed_default_is_named_beside_what_moved():
    now = hand_made()
    now["method_args"]["T"] = 3.0
    assert regress.config_notes(hand_made(), now) == ["x: method_args.T 4.0 -> 3.0"]


# ---------------------------------------------------------------------------------------------- goldens

def test_every_entry_has_a_golden_and_every_golden_an_entry():
    """Fails without data too: a method registered without a golden, or a golden left behind."""
    names = {e.name for e in regress.entries()}
    on_disk = {p.stem for p in regress.GOLDEN_DIR.glob("*.json")}
    assert names == on_disk, (f"missing goldens {sorted(names - on_disk)} (create: ipsd regress --methods NAME "
                              f"--update); stale goldens {sorted(on_disk - names)}")
    assert {e.method for e in regress.entries()} == set(regress.registered_methods())
    for entry in regress.entries():
        golden = regress.read_golden(entry)
        assert golden["method"] == entry.method and golden["made_on"]["versions"]["torch"]
        assert golden["made_on"]["cpu"] and golden["run"]["threads"] == 1
        steps = regress.BASE["epochs"]
        assert all(len(v) == steps for v in golden["series"].values()), entry.name
        assert any(k.startswith("loss.") for k in golden["series"]), entry.name


def test_an_unknown_entry_or_a_run_setting_is_one_error_line(capsys):
    assert main(["regress", "--methods", "ipz-constant"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ipsd: error: --methods: no entry 'ipz-constant'")
    assert "ips-constant" in err[0]
    assert main(["regress", "--methods", "hard", "epochs=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only data_root= may be set, not epochs" in err[0]


def test_a_method_name_selects_all_its_entries_an_entry_name_one():
    assert [e.name for e in regress.select(["dlb"])] == ["dlb", "dlb-paper"]
    assert [e.name for e in regress.select(["dlb"], exact=True)] == ["dlb"]


# ------------------------------------------------------------------------------------------- real data

def test_every_method_matches_its_golden(cifar10_root):
    outcome = regress.check(None, str(cifar10_root))
    print(outcome.render())
    assert outcome.ok, outcome.summary()
    assert set(outcome.checked) == {e.name for e in regress.entries()}


@pytest.mark.parametrize("plant", PLANTS, ids=lambda p: p.name)
def test_a_planted_behaviour_change_fails_the_gate_naming_entry_and_term(plant, cifar10_root):
    with plant.patch():
        outcome = regress.check(list(plant.entries), str(cifar10_root), exact=True)
    failed = outcome.failed_terms()
    assert set(failed) == set(plant.entries), outcome.render()
    text = outcome.render().splitlines()
    for entry in plant.entries:
        assert plant.term in failed[entry]
        assert any(line.split()[:2] == [entry, plant.term] and line.endswith("FAIL") for line in text), text
        assert f"{entry} (" in outcome.summary()


def test_a_change_without_behavioural_effect_passes(cifar10_root):
    calls = []

    def counted(*args):
        calls.append(1)
        return kl_t2_explicit(*args)

    import ipsd.engine

    with rebound(ipsd.losses.kl_t2, counted), pytest.MonkeyPatch.context() as mp:
        mp.setattr(ipsd.engine, "sum", reversed_sum, raising=False)
        outcome = regress.check(["ips", "cskd", "dlb", "kd"], str(cifar10_root), exact=True)
    assert calls, "the rewritten KL was not called: the patch missed the methods' lookups"
    assert outcome.ok, outcome.render()


def test_missing_golden_names_its_command_and_update_rewrites_and_shows_the_diff(cifar10_root, tmp_path):
    root = str(cifar10_root)
    outcome = regress.check(["hard"], root, folder=tmp_path)
    assert not outcome.ok and [e.name for e in outcome.missing] == ["hard"]
    assert "no golden for hard: create it with `ipsd regress --methods hard --update`" in outcome.render()
    regress.check(["hard"], root, update=True, folder=tmp_path)
    first = json.loads((tmp_path / "hard.json").read_text())
    assert regress.check(["hard"], root, folder=tmp_path).moved == []
    tampered = copy.deepcopy(first)
    tampered["series"]["loss.ce"][2] *= 1.01
    (tmp_path / "hard.json").write_text(json.dumps(tampered))
    diff = regress.check(["hard"], root, update=True, folder=tmp_path)
    (m,) = [m for m in diff.moved if m.quantity == "loss.ce"]
    assert m.step == 3 and m.failed and m.change == pytest.approx(0.01 / 1.01, rel=1e-6)  # |g - 1.01 g| / 1.01 g
    assert "loss.ce" in diff.render(update=True)
    assert json.loads((tmp_path / "hard.json").read_text())["series"] == first["series"]
