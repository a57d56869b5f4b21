"""Which differences between table cells hold: per-cell summaries, Welch intervals, a bootstrap mean gain.

Pure numpy + scipy; no I/O. ``welch`` works from summary statistics only (n, mean, sample SD), so the
same test applies to our seeds and to a paper's published "mean ± std of n runs".

- ``describe``: n, mean and sample SD (ddof=1) of one cell's per-seed values.
- ``welch``: the difference a − b with a Welch (unequal-variance) t confidence interval and two-sided p.
- ``mark``: the one text mark tables put on a difference whose interval excludes 0.
- ``bootstrap_mean_gain``: across columns, the mean of per-column differences of means with a
  percentile bootstrap interval over seeds.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MARK = "*"
NAN = float("nan")


@dataclass(frozen=True)
class Summary:
    """One cell: number of values, mean, sample SD (ddof=1; NaN when n < 2)."""

    n: int
    mean: float
    sd: float

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError(f"n={self.n} is negative")

    @property
    def se(self) -> float:
        """Standard error of the mean, sd / sqrt(n); NaN when n < 2 or sd is NaN."""
        if self.n < 2 or math.isnan(self.sd):
            return NAN
        return self.sd / math.sqrt(self.n)


def describe(values: Sequence[float]) -> Summary:
    """Summary of 1-D values: n, mean (NaN when n = 0), sample SD ddof=1 (NaN when n < 2).

    A NaN among the values propagates to mean and SD; nothing is dropped.
    """
    x = np.asarray(values, dtype=float)
    if x.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {x.shape}")
    n = int(x.size)
    mean = float(np.mean(x)) if n else NAN
    sd = float(np.std(x, ddof=1)) if n >= 2 else NAN
    return Summary(n, mean, sd)


@dataclass(frozen=True)
class Diff:
    """a − b with its confidence interval [lo, hi], two-sided p value and Welch–Satterthwaite df."""

    diff: float
    lo: float
    hi: float
    p: float
    df: float

    @property
    def holds(self) -> bool:
        """True when the interval excludes 0; False when it contains 0 or is NaN."""
        return bool(self.lo > 0 or self.hi < 0)  # comparisons with NaN are False


def welch(a: Summary, b: Summary, level: float = 0.95) -> Diff:
    """Welch's t interval and two-sided p for mean(a) − mean(b), from summary statistics only.

    se = sqrt(sa²/na + sb²/nb); df = se⁴ / ((sa²/na)²/(na−1) + (sb²/nb)²/(nb−1));
    interval = diff ± t.ppf((1 + level)/2, df) · se; p = 2 · t.sf(|diff| / se, df).

    ``diff`` is the plain difference of means whenever both means are finite. ``lo``, ``hi``, ``p`` and
    ``df`` are NaN (so ``holds`` is False) when either side has n < 2, either SD is NaN, or both SDs are 0.
    Both SDs 0: the standard error is 0 and df is 0/0, so there is no t distribution to refer to, and
    the data give no estimate of run-to-run noise (a published "± 0.00" is rounding; seeds that give
    identical accuracies show no noise, not its absence). So no difference is declared to hold there,
    whether or not the means differ. This is a deliberate departure from scipy 1.17's
    ``ttest_ind(..., equal_var=False)``, which gives NaN only for equal means and t = ±inf, p = 0
    (with df 1) when they differ; that would mark any two zero-SD cells as a sure difference.
    One SD 0 and the other positive is an ordinary Welch test (df = n − 1 of the other side).
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    diff = a.mean - b.mean
    if a.n < 2 or b.n < 2 or math.isnan(a.sd) or math.isnan(b.sd) or math.isnan(diff):
        return Diff(diff, NAN, NAN, NAN, NAN)
    va, vb = a.sd**2 / a.n, b.sd**2 / b.n
    var = va + vb
    if var == 0:
        return Diff(diff, NAN, NAN, NAN, NAN)
    se = math.sqrt(var)
    df = var**2 / (va**2 / (a.n - 1) + vb**2 / (b.n - 1))
    from scipy import stats as _st  # imported on first use: reading a table needs no scipy start-up

    half = float(_st.t.ppf(0.5 + level / 2, df)) * se
    p = float(2 * _st.t.sf(abs(diff) / se, df))
    return Diff(diff, diff - half, diff + half, p, df)


def mark(diff: Diff | Gain) -> str:
    """The table mark: ``MARK`` ("*") when the interval excludes 0, "" otherwise (NaN included)."""
    return MARK if diff.holds else ""


@dataclass(frozen=True)
class Gain:
    """Mean gain across columns with its percentile bootstrap interval [lo, hi]."""

    mean: float
    lo: float
    hi: float

    @property
    def holds(self) -> bool:
        """True when the interval excludes 0."""
        return bool(self.lo > 0 or self.hi < 0)


def bootstrap_mean_gain(cells: Sequence[tuple[Sequence[float], Sequence[float]]], level: float = 0.95,
                        n_resamples: int = 10_000, seed: int = 0) -> Gain:
    """Mean over columns of each column's gain mean(a) − mean(b), with a percentile bootstrap interval.

    ``cells[j] = (a_j, b_j)``: column j's per-seed values of the row (a) and of what it is compared with
    (b). The runs of a and b are independent (their seeds differ), so each resample draws a_j and b_j
    separately, each with replacement and its own size; the columns themselves are fixed, not resampled
    (the interval is over seed noise for these models, not over a population of models). Each
    resample's statistic is the unweighted mean over columns of mean(a_j*) − mean(b_j*); lo/hi are its
    (1 ∓ level)/2 quantiles. Random numbers come from ``numpy.random.default_rng(seed)``, so a call is
    reproducible. No column, an empty side or a non-finite value raises ValueError.
    """
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples} must be >= 1")
    if not cells:
        raise ValueError("no columns")
    sides = []
    for j, cell in enumerate(cells):
        if len(cell) != 2:
            raise ValueError(f"cells[{j}] must be a pair (a values, b values)")
        pair = tuple(np.asarray(v, dtype=float) for v in cell)
        for name, v in zip("ab", pair):
            if v.ndim != 1 or v.size == 0:
                raise ValueError(f"cells[{j}].{name} must be a non-empty 1-D sequence")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"cells[{j}].{name} has a non-finite value")
        sides.append(pair)
    rng = np.random.default_rng(seed)

    def resampled_mean(v: np.ndarray) -> np.ndarray:
        return v[rng.integers(0, v.size, size=(n_resamples, v.size))].mean(axis=1)

    boot = sum(resampled_mean(a) - resampled_mean(b) for a, b in sides) / len(sides)
    lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
    return Gain(float(np.mean([a.mean() - b.mean() for a, b in sides])), float(lo), float(hi))
