"""Safety metrics against hand computations on a fixed 6-sample, 3-class example."""
from __future__ import annotations

import math

import pytest
import torch

from ipsd.evaluation.safety import aurc, fpr_at_tpr, oracle_aurc, safety_metrics

# Probabilities written out; logits = log p reproduces them under softmax.
#  #  p                      label  argmax  correct  conf
#  1  [0.90, 0.05, 0.05]     0      0       yes      0.90
#  2  [0.08, 0.82, 0.10]     1      1       yes      0.82
#  3  [0.70, 0.20, 0.10]     1      0       no       0.70
#  4  [0.20, 0.18, 0.62]     2      2       yes      0.62
#  5  [0.30, 0.41, 0.29]     1      1       yes      0.41
#  6  [0.38, 0.32, 0.30]     2      0       no       0.38
P = torch.tensor([[0.90, 0.05, 0.05], [0.08, 0.82, 0.10], [0.70, 0.20, 0.10],
                  [0.20, 0.18, 0.62], [0.30, 0.41, 0.29], [0.38, 0.32, 0.30]], dtype=torch.float64)
Y = torch.tensor([0, 1, 1, 2, 1, 2])


@pytest.fixture(scope="module")
def metrics() -> dict:
    # shuffled rows: nothing may depend on input order
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    return safety_metrics(P.log()[perm], Y[perm])


def test_accuracy(metrics):
    assert metrics["accuracy_%"] == pytest.approx(100 * 4 / 6)


def test_aurc(metrics):
    # by confidence: errors 0,0,1,0,0,1 -> risk at k=1..6: 0, 0, 1/3, 1/4, 1/5, 2/6
    # AURC = (1/3 + 1/4 + 1/5 + 1/3) / 6 = (67/60) / 6 = 67/360 = 0.186111
    assert metrics["AURC_x1e3"] == pytest.approx(1e3 * 67 / 360)


def test_eaurc_continuous_oracle(metrics):
    # r = 2/6: oracle = r + (1-r) ln(1-r) = 1/3 + (2/3) ln(2/3) = 0.063023; E-AURC = 0.186111 - 0.063023
    oracle = 1 / 3 + (2 / 3) * math.log(2 / 3)
    assert metrics["EAURC_x1e3"] == pytest.approx(1e3 * (67 / 360 - oracle))
    assert metrics["EAURC_x1e3"] == pytest.approx(123.088, abs=1e-3)


def test_fpr_at_95_tpr(metrics):
    # positives' confidences 0.90, 0.82, 0.62, 0.41: TPR >= 0.95 needs all four, threshold <= 0.41;
    # negatives 0.70 (above) and 0.38 (below) -> FPR = 1/2
    assert metrics["FPR_x1e2"] == pytest.approx(50.0)


def test_ece_15_bins(metrics):
    # 15 bins of width 1/15: confidences fall in bins 13, 12, 10, 9, 6, 5 (one sample each), so
    # ECE = mean |correct - conf| = (0.10 + 0.18 + 0.70 + 0.38 + 0.59 + 0.38) / 6 = 2.33 / 6
    assert metrics["ECE_bins"] == 15
    assert metrics["ECE_x1e2"] == pytest.approx(100 * 2.33 / 6, abs=1e-4)


def test_ece_shared_bins():
    # 3 bins: [2/3, 1) holds 0.90 ok, 0.82 ok, 0.70 wrong -> acc 2/3, mean conf 2.42/3, gap 0.14, weight 1/2
    #         [1/3, 2/3) holds 0.62 ok, 0.41 ok, 0.38 wrong -> acc 2/3, mean conf 1.41/3, gap 0.59/3, weight 1/2
    # ECE = 0.07 + 0.098333 = 0.168333
    m = safety_metrics(P.log(), Y, bins=3)
    assert m["ECE_bins"] == 3
    assert m["ECE_x1e2"] == pytest.approx(100 * (0.5 * 0.14 + 0.5 * 0.59 / 3), abs=1e-4)


def test_brier_sums_over_classes(metrics):
    # per sample sum_c (p_c - onehot_c)^2:
    # 1: .1^2+.05^2+.05^2 = .0150     2: .08^2+.18^2+.10^2 = .0488    3: .7^2+.8^2+.1^2 = 1.1400
    # 4: .2^2+.18^2+.38^2 = .2168     5: .3^2+.59^2+.29^2 = .5222     6: .38^2+.32^2+.7^2 = .7368
    # mean = 2.6796 / 6 = 0.4466
    assert metrics["Brier_x1e2"] == pytest.approx(100 * 2.6796 / 6)


def test_nll(metrics):
    # -mean ln p_label = -(ln .9 + ln .82 + ln .2 + ln .62 + ln .41 + ln .3) / 6 = 4.486857 / 6
    p_label = [0.90, 0.82, 0.20, 0.62, 0.41, 0.30]
    assert metrics["NLL"] == pytest.approx(-sum(math.log(p) for p in p_label) / 6)
    assert metrics["NLL"] == pytest.approx(0.747810, abs=1e-6)


def test_plain_floats(metrics):
    assert all(type(v) is float for v in metrics.values())


def test_perfect_ranking_eaurc_is_discrete_minus_continuous_oracle():
    # errors ranked last among 6, 2 errors: risks 0,0,0,0,1/5,2/6 -> AURC = (1/5 + 1/3) / 6 = 8/90
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    correct = torch.tensor([True, True, True, True, False, False])
    assert aurc(conf, correct) == pytest.approx(8 / 90)
    assert aurc(conf, correct) > oracle_aurc(2 / 6)  # the discrete oracle lies above the continuous one


def test_aurc_ties_use_the_group_average():
    # two samples tied at 0.9, one of them wrong, then a correct one at 0.5:
    # expected errors among the top 1 = 1/2, top 2 = 1, top 3 = 1 -> risks 1/2, 1/2, 1/3, AURC = 4/9
    conf = torch.tensor([0.9, 0.9, 0.5])
    for correct in (torch.tensor([False, True, True]), torch.tensor([True, False, True])):
        assert aurc(conf, correct) == pytest.approx(4 / 9)


def test_oracle_aurc_ends():
    assert oracle_aurc(0.0) == 0.0
    assert oracle_aurc(1.0) == 1.0
    assert oracle_aurc(0.5) == pytest.approx(0.5 + 0.5 * math.log(0.5))


def test_fpr_ignores_the_lowest_5_percent_of_positives():
    # 20 positives at 0.99, 0.98, ..., 0.80; TPR = 19/20 = 0.95 is reached at threshold 0.81.
    pos = torch.tensor([0.99 - 0.01 * i for i in range(20)])
    correct = torch.cat([torch.ones(20, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)])
    # negatives 0.805, 0.5, 0.3 all lie below 0.81 -> FPR 0
    assert fpr_at_tpr(torch.cat([pos, torch.tensor([0.805, 0.5, 0.3])]), correct) == 0.0
    # a negative at 0.815 lies above 0.81 -> FPR 1/3
    assert fpr_at_tpr(torch.cat([pos, torch.tensor([0.815, 0.5, 0.3])]), correct) == pytest.approx(1 / 3)


def test_fpr_undefined_without_errors():
    assert math.isnan(fpr_at_tpr(torch.tensor([0.9, 0.8]), torch.tensor([True, True])))


def test_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        safety_metrics(torch.zeros(4, 3), torch.zeros(5, dtype=torch.long))
