"""LR and p_r schedules, checked against the paper's epoch tables written out by hand."""
import math

import pytest

from ipsd.schedules import lr_at, scale_boundaries, step_lr, swap_probability


def test_step_lr_matches_repdistiller_boundaries():
    ms = [150, 180, 210]
    assert step_lr(0.05, 1, ms, 0.1) == 0.05
    assert step_lr(0.05, 150, ms, 0.1) == 0.05
    assert abs(step_lr(0.05, 151, ms, 0.1) - 5e-3) < 1e-15
    assert abs(step_lr(0.05, 181, ms, 0.1) - 5e-4) < 1e-15
    assert abs(step_lr(0.05, 211, ms, 0.1) - 5e-5) < 1e-15
    assert abs(step_lr(0.05, 240, ms, 0.1) - 5e-5) < 1e-15


def test_boundaries_scale_in_proportion():
    assert scale_boundaries([150, 180, 210], 240, 240) == [150, 180, 210]
    assert scale_boundaries([150, 180, 210], 24, 240) == [15, 18, 21]
    assert scale_boundaries([30, 80, 120], 120, 240) == [15, 40, 60]


def test_incremental_pr_paper_table():
    expect = {1: 0.1, 30: 0.1, 31: 0.2, 80: 0.2, 81: 0.3, 120: 0.3, 121: 0.5, 240: 0.5}
    for e, p in expect.items():
        assert swap_probability("incremental", e, 240, 0.5) == p
    assert swap_probability("incremental", 16, 24, 0.5) == 0.5  # 120/240 * 24 = 12
    assert swap_probability("incremental", 4, 24, 0.5) == 0.2  # 30/240 * 24 = 3
    assert swap_probability("constant", 1, 240, 0.37) == 0.37


def test_lr_at_step_without_warmup_is_step_lr_on_scaled_milestones():
    # 240-epoch milestones 150/180/210 scaled to 24 epochs: 15/18/21
    expect = {1: 0.05, 15: 0.05, 16: 5e-3, 18: 5e-3, 19: 5e-4, 21: 5e-4, 22: 5e-5, 24: 5e-5}
    for e, lr in expect.items():
        got = lr_at(e, base=0.05, epochs=24, ref=240, milestones=[150, 180, 210], decay=0.1)
        assert got == pytest.approx(lr, rel=1e-12), e


def test_lr_at_cosine_hand_values():
    # 10 epochs, no warm-up: epoch e trains at 0.1 * (1 + cos(pi (e-1) / 10)) / 2
    # epoch 1 = base; mid-run (e - 1 = 5 of 10) = base / 2; the value after the last epoch (e = 11) = 0
    for e, lr in {1: 0.1, 6: 0.05, 11: 0.0}.items():
        assert lr_at(e, base=0.1, epochs=10, ref=10, schedule="cosine") == pytest.approx(lr, abs=1e-15), e
    # epoch 3: (1 + cos(pi/5)) / 2 = (1 + (1 + sqrt 5) / 4) / 2 = (5 + sqrt 5) / 8
    assert lr_at(3, base=0.1, epochs=10, ref=10, schedule="cosine") == pytest.approx(0.1 * (5 + math.sqrt(5)) / 8)
    # last epoch: (1 + cos(9 pi / 10)) / 2 = (1 - cos(pi / 10)) / 2 = sin^2(pi / 20)
    assert lr_at(10, base=0.1, epochs=10, ref=10, schedule="cosine") == pytest.approx(0.1 * math.sin(math.pi / 20) ** 2)


def test_lr_at_linear_warmup_then_cosine():
    # 5 warm-up epochs of a 20-epoch run: base * e / 5, then cosine over the remaining 15 epochs
    for e, frac in {1: 1 / 5, 2: 2 / 5, 5: 1.0, 6: 1.0}.items():
        assert lr_at(e, base=0.5, epochs=20, ref=20, schedule="cosine", warmup=5) == pytest.approx(0.5 * frac), e
    # (e - 5 - 1) / 15 = 1/3 at e = 11: (1 + cos(pi/3)) / 2 = 3/4; = 2/3 at e = 16: (1 - 1/2) / 2 = 1/4
    assert lr_at(11, base=0.5, epochs=20, ref=20, schedule="cosine", warmup=5) == pytest.approx(0.5 * 3 / 4)
    assert lr_at(16, base=0.5, epochs=20, ref=20, schedule="cosine", warmup=5) == pytest.approx(0.5 / 4)


def test_lr_at_warmup_scales_like_milestones_and_precedes_step():
    # warm-up 10 of a 100-epoch schedule, run for 50 epochs: 5 warm-up epochs; milestones 30/60 -> 15/30
    kw = {"base": 0.2, "epochs": 50, "ref": 100, "milestones": [30, 60], "decay": 0.1, "warmup": 10}
    expect = {1: 0.04, 3: 0.12, 5: 0.2, 6: 0.2, 15: 0.2, 16: 0.02, 31: 0.002}
    for e, lr in expect.items():
        assert lr_at(e, **kw) == pytest.approx(lr, rel=1e-12), e
    # MViTv2's 70-of-300 warm-up written as 47 of a 200-epoch run: 47 epochs at 200, 5 at 20 (4.7 rounds to 5)
    assert lr_at(47, base=1.0, epochs=200, ref=200, schedule="cosine", warmup=47) == 1.0
    assert lr_at(1, base=1.0, epochs=20, ref=200, schedule="cosine", warmup=47) == pytest.approx(1 / 5)


def test_lr_at_refuses_unknown_schedule():
    with pytest.raises(ValueError, match="unknown LR schedule 'linear'"):
        lr_at(1, base=0.1, epochs=10, ref=10, schedule="linear")
