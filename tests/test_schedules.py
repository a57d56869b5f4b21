"""LR and p_r schedules, checked against the paper's epoch tables written out by hand."""
from ipsd.schedules import scale_boundaries, step_lr, swap_probability


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
