"""benchmarks.stats: Welch intervals against a hand computation and scipy, the paper's own n = 3 numbers,
edge cases, the bootstrap mean gain.

Expected values are worked out here (the Welch SE/df arithmetic is written out below) or come from an
independent implementation (``scipy.stats.ttest_ind`` on raw samples, ``ttest_ind_from_stats``).
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from scipy import stats as st

from benchmarks.stats import MARK, Diff, Gain, Summary, bootstrap_mean_gain, describe, mark, welch

A = [1.0, 2.0, 3.0, 4.0]
B = [2.0, 4.0, 6.0]
# the paper's published numbers; not imported from benchmarks.report, which pulls in the training engine
PAPER_DIR = Path(__file__).resolve().parents[1] / "results" / "paper"


# ------------------------------------------------------------------------------------- hand computation
def test_describe_by_hand():
    s = describe(A)
    # mean 10/4; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, over n − 1 = 3
    assert s == Summary(4, 2.5, pytest.approx(math.sqrt(5 / 3)))
    assert s.se == pytest.approx(math.sqrt(5 / 3) / 2)
    t = describe(B)
    # mean 4; squared deviations 4 + 0 + 4 = 8, over 2
    assert (t.n, t.mean, t.sd) == (3, 4.0, pytest.approx(2.0))


def test_welch_by_hand():
    # a: var 5/3, n 4 -> va = 5/12;  b: var 4, n 3 -> vb = 4/3 = 16/12
    va, vb = 5 / 12, 16 / 12
    var = va + vb                                    # 21/12 = 7/4
    assert var == pytest.approx(7 / 4)
    se = math.sqrt(var)                              # sqrt(7)/2 ≈ 1.3229
    df = var**2 / (va**2 / 3 + vb**2 / 2)            # (49/16) / (25/432 + 384/432) = 1323/409
    assert df == pytest.approx(1323 / 409)           # ≈ 3.2347
    diff = 2.5 - 4.0
    tq = st.t.ppf(0.975, df)                         # the reference distribution
    d = welch(describe(A), describe(B))
    assert d.diff == pytest.approx(diff)
    assert d.df == pytest.approx(df)
    assert d.lo == pytest.approx(diff - tq * se)
    assert d.hi == pytest.approx(diff + tq * se)
    assert d.p == pytest.approx(2 * st.t.sf(abs(diff) / se, df))
    assert not d.holds and mark(d) == ""             # the interval ≈ [-5.5, 2.5] contains 0
    # an independent implementation on the raw samples
    ref = st.ttest_ind(A, B, equal_var=False)
    assert d.p == pytest.approx(ref.pvalue, rel=1e-10)
    # another level: the 80% interval is narrower, same p
    d80 = welch(describe(A), describe(B), level=0.8)
    assert d80.hi - d80.lo == pytest.approx(2 * st.t.ppf(0.9, df) * se)
    assert d80.p == d.p


def test_welch_order_flips_sign():
    ab, ba = welch(describe(A), describe(B)), welch(describe(B), describe(A))
    assert ba.diff == pytest.approx(-ab.diff)
    assert (ba.lo, ba.hi) == (pytest.approx(-ab.hi), pytest.approx(-ab.lo))
    assert ba.p == pytest.approx(ab.p)


def test_clear_difference_holds():
    a, b = [10.0, 10.1, 9.9], [1.0, 1.1, 0.9]
    d = welch(describe(a), describe(b))
    assert d.holds and d.lo > 0 and mark(d) == MARK == "*"
    assert d.p == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-10)
    assert welch(describe(b), describe(a)).holds    # excluding 0 from below holds too


def test_level_checked():
    with pytest.raises(ValueError):
        welch(describe(A), describe(B), level=1.0)
    with pytest.raises(ValueError):
        welch(describe(A), describe(B), level=0)


# ------------------------------------------------------------------------------------- paper's numbers
def _paper_table3() -> dict[tuple[str, str], Summary]:
    path = PAPER_DIR / "table3_cifar100_selfdistill.csv"
    cells = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            mean = float(row["top1_mean"]) if row["top1_mean"] else float("nan")
            sd = float(row["top1_std"]) if row["top1_std"] else float("nan")
            cells[(row["method"], row["model"])] = Summary(3, mean, sd)
    return cells


def test_paper_ips_vs_dlb_not_all_hold():
    cells = _paper_table3()
    for model in ("ResNet18", "VGG13", "ShuffleNetV1"):
        ips, dlb = cells[("IPS (4x4)", model)], cells[("DLB", model)]
        d = welch(ips, dlb)
        assert d.diff > 0                             # the paper's claimed win ...
        assert not d.holds and d.p > 0.05, model      # ... does not reach p < 0.05 at n = 3
        assert mark(d) == ""
        ref = st.ttest_ind_from_stats(ips.mean, ips.sd, 3, dlb.mean, dlb.sd, 3, equal_var=False)
        assert d.p == pytest.approx(ref.pvalue, rel=1e-10)


def test_paper_ips_vs_hard_label_holds():
    cells = _paper_table3()
    # ResNet18: 80.53 ± 0.16 vs 77.92 ± 0.10, n = 3: se = sqrt((0.0256 + 0.01)/3) ≈ 0.109, t ≈ 24
    d = welch(cells[("IPS (4x4)", "ResNet18")], cells[("Hard Label", "ResNet18")])
    assert d.diff == pytest.approx(2.61)
    assert d.holds and d.p < 0.05 and mark(d) == MARK


def test_paper_missing_cell_is_nan():
    cells = _paper_table3()
    d = welch(cells[("FER", "VGG13")], cells[("Hard Label", "VGG13")])   # the paper has no FER/VGG13
    assert math.isnan(d.diff) and math.isnan(d.lo) and not d.holds


# ------------------------------------------------------------------------------------------ edge cases
def test_n1_summary_and_welch():
    s = describe([3.0])
    assert (s.n, s.mean) == (1, 3.0) and math.isnan(s.sd) and math.isnan(s.se)
    d = welch(s, describe(B))
    assert d.diff == -1.0                             # the difference of means is still reported
    assert all(math.isnan(v) for v in (d.lo, d.hi, d.p, d.df))
    assert not d.holds and mark(d) == ""
    assert not welch(describe(B), s).holds
    # n = 1 with a finite SD given (e.g. a hand-written Summary): still no test, SE is undefined
    one = Summary(1, 3.0, 0.5)
    assert math.isnan(one.se)
    assert math.isnan(welch(one, describe(B)).p) and not welch(one, describe(B)).holds


def test_n0_summary_and_welch():
    s = describe([])
    assert s.n == 0 and math.isnan(s.mean) and math.isnan(s.sd) and math.isnan(s.se)
    d = welch(s, describe(A))
    assert math.isnan(d.diff) and math.isnan(d.lo) and not d.holds


@pytest.mark.filterwarnings("ignore:Precision loss occurred:RuntimeWarning")  # scipy, on the constant sample
def test_one_sd_zero_is_ordinary_welch():
    a, b = [5.0, 5.0, 5.0], [0.0, 1.0, 2.0]
    d = welch(describe(a), describe(b))
    assert d.df == pytest.approx(2.0)                 # only b contributes: df = nb − 1
    se = 1.0 / math.sqrt(3)                           # sd_b = 1
    assert d.lo == pytest.approx(4.0 - st.t.ppf(0.975, 2) * se)
    assert d.p == pytest.approx(st.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-10)
    assert d.holds


@pytest.mark.parametrize("b", [[2.0, 2.0, 2.0], [7.0, 7.0]])
def test_both_sd_zero_is_nan(b):
    a = [2.0, 2.0, 2.0]
    d = welch(describe(a), describe(b))
    assert d.diff == pytest.approx(2.0 - b[0])
    assert all(math.isnan(v) for v in (d.lo, d.hi, d.p, d.df))
    assert not d.holds and mark(d) == ""
    # scipy gives NaN only for equal means; for different means it says p = 0, which stats.py refuses
    with pytest.warns(RuntimeWarning):
        ref = st.ttest_ind(a, b, equal_var=False).pvalue
    assert math.isnan(ref) if b[0] == a[0] else ref == 0.0


def test_nan_interval_does_not_hold():
    nan = float("nan")
    assert not Diff(1.0, nan, nan, nan, nan).holds
    assert not Diff(1.0, -0.5, 2.0, 0.3, 4.0).holds
    assert Diff(1.0, 0.5, 2.0, 0.01, 4.0).holds


def test_negative_n_rejected():
    with pytest.raises(ValueError):
        Summary(-1, 0.0, 0.0)


# ------------------------------------------------------------------------------------------- bootstrap
def test_bootstrap_constant_gain_zero_width():
    g = bootstrap_mean_gain([([1.5, 1.5, 1.5], [0.0, 0.0]), ([2.0, 2.0], [0.5]), ([1.5], [0.0])], seed=3)
    assert g.mean == pytest.approx(1.5) and g.lo == g.hi == pytest.approx(1.5)
    assert g.holds and mark(g) == MARK


def test_bootstrap_columns_not_pooled():
    # per-column constant gains 1 (2 seeds) and 3 (3 seeds): the mean over columns is 2 (pooling the 5
    # per-seed gains would give 2.2), and with no spread inside any cell the interval has zero width
    g = bootstrap_mean_gain([([1.0, 1.0], [0.0, 0.0]), ([3.0, 3.0, 3.0], [0.0, 0.0, 0.0])])
    assert g.mean == pytest.approx(2.0) and g.lo == pytest.approx(2.0) and g.hi == pytest.approx(2.0)


@pytest.mark.parametrize("cell, expected", [
    # a = [0, 1], b = [0]: a resample's gain is 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% quantiles of 10,000 resamples are 0 and 1
    (([0.0, 1.0], [0.0]), (0.5, 0.0, 1.0)),
    # the reference's spread counts too: a = [0], b = [0, 1] gives gains 0, -0.5, -1 (1/4, 1/2, 1/4)
    (([0.0], [0.0, 1.0]), (-0.5, -1.0, 0.0)),
])
def test_bootstrap_percentiles_two_values(cell, expected):
    g = bootstrap_mean_gain([cell], seed=0)
    assert (g.mean, g.lo, g.hi) == expected
    assert not g.holds


def test_bootstrap_seeded_reproducible():
    cells = [([0.3, 0.9, 0.1], [0.0, 0.2]), ([1.2, 0.4, 0.8], [0.1, 0.3, 0.2]), ([0.5, -0.2, 0.6], [0.0])]
    a, b = bootstrap_mean_gain(cells, seed=7), bootstrap_mean_gain(cells, seed=7)
    assert a == b and isinstance(a, Gain)
    assert a.lo < a.mean < a.hi
    assert a.mean == pytest.approx(((1.3 / 3 - 0.1) + (2.4 / 3 - 0.2) + (0.9 / 3 - 0.0)) / 3)
    # the seed is used: with few resamples two seeds' quantiles differ (10,000 resamples of so few
    # values land on the same discrete quantiles)
    few = [bootstrap_mean_gain(cells, n_resamples=40, seed=s) for s in (7, 8)]
    assert (few[0].lo, few[0].hi) != (few[1].lo, few[1].hi)


@pytest.mark.parametrize("cells", [[], [([], [1.0])], [([1.0], [])], [([1.0, float("nan")], [1.0])],
                                   [([1.0],)]])
def test_bootstrap_rejects_bad_input(cells):
    with pytest.raises(ValueError):
        bootstrap_mean_gain(cells)
