"""Invariants of the IPS patch-swap operator (spec §a.2 (i)-(vi), pitfalls P1-P4)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ipsd.patch_swap import apply_swap, apply_swap_loop, patch_swap, swap_cells

CIFAR_MEAN = torch.tensor([0.5071, 0.4867, 0.4408]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2675, 0.2565, 0.2761]).view(1, 3, 1, 1)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(n: int, g: torch.Generator, dtype: torch.dtype = torch.float32, h: int = 32, w: int = 32) -> torch.Tensor:
    """Photo-like batch: smooth colour fields with sensor noise; uint8 in [0, 255] or CIFAR-normalised float."""
    low = torch.rand(n, 3, 4, 4, generator=g)
    img = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    img = (img + 0.04 * torch.randn(n, 3, h, w, generator=g)).clamp(0, 1)
    if dtype == torch.uint8:
        return (img * 255).round().to(torch.uint8)
    if dtype == torch.bool:
        return img > 0.5
    return ((img - CIFAR_MEAN) / CIFAR_STD).to(dtype)


def pair(n: int, seed: int, dtype: torch.dtype = torch.float32, h: int = 32, w: int = 32):
    g = gen(seed)
    return images(n, g, dtype, h, w), images(n, g, dtype, h, w)


def cell_pixels(cells: torch.Tensor, grid: int, h: int, w: int) -> torch.Tensor:
    """(B, grid²) cell mask -> (B, H, W) pixel mask, via repeat_interleave (independent of the module)."""
    b = cells.shape[0]
    m = cells.view(b, grid, grid).repeat_interleave(h // grid, dim=1).repeat_interleave(w // grid, dim=2)
    return m


# ---------------------------------------------------------------- (i), (ii), (iii) on outputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("grid", [2, 4, 8])
def test_sum_and_pixel_set_preserved(dtype: torch.dtype, grid: int) -> None:
    """(i) xa'+xb' == xa+xb and (ii) {xa',xb'} == {xa,xb} at every pixel and channel."""
    xa, xb = pair(64, 1, dtype)
    oa, ob = patch_swap(xa, xb, grid, 0.7, gen(2))
    wide = torch.float64 if dtype.is_floating_point else torch.int64
    assert torch.equal(oa.to(wide) + ob.to(wide), xa.to(wide) + xb.to(wide))
    same = (oa == xa) & (ob == xb)
    crossed = (oa == xb) & (ob == xa)
    assert bool((same | crossed).all())
    assert bool(crossed[(xa != xb)].any()), "nothing was swapped; the test would be vacuous"


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
@pytest.mark.parametrize("grid", [2, 4, 8])
def test_changed_region_is_whole_cells_same_for_a_and_b(dtype: torch.dtype, grid: int) -> None:
    """(iii) derive the cell mask from the outputs alone; it must be whole cells, shared by a and b."""
    n, h, w = 64, 32, 32
    xa, xb = pair(n, 3, dtype)
    cells = swap_cells(n, grid, 0.8, gen(4))
    oa, ob = apply_swap(xa, xb, cells, grid)

    differ = (xa != xb).any(dim=1)  # (B,H,W): pixels where a swap is observable
    assert differ.float().mean() > 0.95
    changed_a = (oa != xa).any(dim=1)
    changed_b = (ob != xb).any(dim=1)
    assert torch.equal(changed_a, changed_b), "a and b changed in different places"
    # pixels that changed took the partner's value in *all* channels
    assert bool((oa == xb).all(dim=1)[changed_a].all()) and bool((ob == xa).all(dim=1)[changed_b].all())

    s_h, s_w = h // grid, w // grid
    derived = changed_a.view(n, grid, s_h, grid, s_w).any(dim=4).any(dim=2).reshape(n, grid * grid)
    # every observable pixel of a touched cell changed, nothing outside touched cells did
    assert torch.equal(changed_a, cell_pixels(derived, grid, h, w) & differ)
    every_cell_observable = differ.view(n, grid, s_h, grid, s_w).any(dim=4).any(dim=2).all()
    assert bool(every_cell_observable)
    assert torch.equal(derived, cells), "outputs do not match the drawn cells"


# ---------------------------------------------------------------- (iv), (v), (vi) on swap_cells


@pytest.mark.parametrize("grid", [2, 4, 8])
def test_swapped_pairs_have_between_1_and_t_minus_1_cells(grid: int) -> None:
    """(iv) uniform mode: 1 <= |Omega| <= grid²-1 for swapped pairs, 0 for unswapped ones."""
    t = grid * grid
    cells = swap_cells(4000, grid, 0.6, gen(5))
    assert cells.dtype == torch.bool and cells.shape == (4000, t)
    k = cells.sum(dim=1)
    swapped = k > 0
    assert bool(((k[swapped] >= 1) & (k[swapped] <= t - 1)).all())
    assert int(k.max()) == t - 1 and int(k[swapped].min()) == 1  # both ends are reachable


@pytest.mark.parametrize("grid", [2, 4, 8])
def test_single_mode_swaps_exactly_one_cell(grid: int) -> None:
    """(iv) k_mode='single' (literal paper snippet, P2) swaps exactly one cell, uniformly placed."""
    t = grid * grid
    n = 200 * t
    cells = swap_cells(n, grid, 1.0, gen(6), k_mode="single")
    assert bool((cells.sum(dim=1) == 1).all())
    counts = cells.sum(dim=0).double()
    expected = n / t
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = t - 1
    assert chi2 < df + 8 * math.sqrt(2 * df), f"cell choice not uniform: chi2={chi2:.1f}, df={df}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_p0_is_identity_and_p1_swaps_every_pair(dtype: torch.dtype) -> None:
    """(v) p=0 leaves every pair untouched (P4: they stay in the batch); p=1 swaps all of them."""
    xa, xb = pair(128, 7, dtype)
    assert not bool(swap_cells(128, 4, 0.0, gen(8)).any())
    oa, ob = patch_swap(xa, xb, 4, 0.0, gen(8))
    assert oa.shape == xa.shape and torch.equal(oa, xa) and torch.equal(ob, xb)

    cells = swap_cells(128, 4, 1.0, gen(9))
    assert bool(cells.any(dim=1).all())
    oa, ob = patch_swap(xa, xb, 4, 1.0, gen(9))
    assert bool((oa != xa).flatten(1).any(dim=1).all()) and bool((ob != xb).flatten(1).any(dim=1).all())


@pytest.mark.parametrize("p", [0.1, 0.5, 0.85])
def test_swap_rate_matches_p(p: float) -> None:
    """(vi) fraction of swapped pairs ~ Binomial(n, p): within 5 sigma."""
    n = 20000
    rate_count = int(swap_cells(n, 4, p, gen(10)).any(dim=1).sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(rate_count - n * p) < 5 * sigma, f"{rate_count} swapped of {n}, expected {n * p:.0f}±{sigma:.0f}"


@pytest.mark.parametrize("grid", [2, 4, 8])
def test_k_uniform_and_subset_uniform(grid: int) -> None:
    """(vi) k ~ U{1..t-1} (chi-square bound) and every cell is chosen with prob E[k]/t = 1/2."""
    t = grid * grid
    n = 400 * (t - 1)
    cells = swap_cells(n, grid, 1.0, gen(11))
    k = cells.sum(dim=1)
    counts = torch.bincount(k, minlength=t + 1).double()
    assert counts[0] == 0 and counts[t] == 0
    expected = n / (t - 1)
    chi2 = float(((counts[1:t] - expected) ** 2 / expected).sum())
    df = t - 2
    assert chi2 < df + 8 * math.sqrt(2 * df), f"k not uniform: chi2={chi2:.1f}, df={df}"

    freq = cells.double().mean(dim=0)
    sigma = math.sqrt(0.25 / n)  # each cell's indicator is Bernoulli(1/2), rows independent
    assert bool(((freq - 0.5).abs() < 5 * sigma).all()), f"cell marginals {freq.tolist()}"


# ---------------------------------------------------------------- vectorised == loop oracle


@pytest.mark.parametrize(
    "dtype, grid, h, w",
    [
        (torch.uint8, 2, 32, 32),
        (torch.uint8, 4, 32, 32),
        (torch.uint8, 8, 32, 32),
        (torch.float32, 2, 32, 32),
        (torch.float32, 4, 32, 32),
        (torch.float32, 8, 32, 32),
        (torch.float16, 4, 32, 32),
        (torch.bool, 4, 32, 32),
        (torch.uint8, 8, 24, 24),  # 3-px cells: no wide-word view, plain path
        (torch.float32, 4, 32, 64),  # non-square image
        (torch.float64, 2, 16, 16),
    ],
)
def test_vectorised_equals_loop(dtype: torch.dtype, grid: int, h: int, w: int) -> None:
    n = 24
    xa, xb = pair(n, 12, dtype, h, w)
    cells = swap_cells(n, grid, 0.75, gen(13))
    fast = apply_swap(xa, xb, cells, grid)
    ref = apply_swap_loop(xa, xb, cells, grid)
    for f, r in zip(fast, ref):
        assert f.dtype == dtype and f.shape == xa.shape
        assert torch.equal(f, r)
    assert not torch.equal(fast[0], xa)


def test_vectorised_equals_loop_on_noncontiguous_and_grad_inputs() -> None:
    """Inputs that cannot be reinterpreted as wide words (channels_last, autograd) take the plain path."""
    xa, xb = pair(16, 14)
    cells = swap_cells(16, 4, 1.0, gen(15))
    ref = apply_swap_loop(xa, xb, cells, 4)
    cl = apply_swap(xa.to(memory_format=torch.channels_last), xb.to(memory_format=torch.channels_last), cells, 4)
    assert torch.equal(cl[0], ref[0]) and torch.equal(cl[1], ref[1])
    ga, gb = xa.clone().requires_grad_(), xb.clone().requires_grad_()
    oa, ob = apply_swap(ga, gb, cells, 4)
    assert torch.equal(oa.detach(), ref[0]) and torch.equal(ob.detach(), ref[1])
    (oa * 2 + ob).sum().backward()
    m = cell_pixels(cells, 4, 32, 32).unsqueeze(1).expand_as(xa)
    assert torch.equal(ga.grad, torch.where(m, 1.0, 2.0)) and torch.equal(gb.grad, torch.where(m, 2.0, 1.0))


def test_loop_oracle_is_itself_correct() -> None:
    """Hand-checked case so the oracle cannot share a bug with apply_swap (cell order is row-major)."""
    xa = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    xb = torch.ones(1, 1, 4, 4, dtype=torch.uint8)
    cells = torch.tensor([[False, True, False, False]])  # top-right 2x2 block
    oa, ob = apply_swap_loop(xa, xb, cells, 2)
    want = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.uint8)
    assert torch.equal(oa[0, 0], want) and torch.equal(ob[0, 0], 1 - want)
    assert torch.equal(apply_swap(xa, xb, cells, 2)[0], oa)


# ---------------------------------------------------------------- errors, determinism, purity


@pytest.mark.parametrize("grid, h, w", [(3, 32, 32), (5, 40, 32), (5, 32, 40)])
def test_grid_not_dividing_image_raises(grid: int, h: int, w: int) -> None:
    xa, xb = pair(2, 16, torch.float32, h, w)
    cells = torch.zeros(2, grid * grid, dtype=torch.bool)
    for call in (
        lambda: apply_swap(xa, xb, cells, grid),
        lambda: apply_swap_loop(xa, xb, cells, grid),
        lambda: patch_swap(xa, xb, grid, 0.5, gen(0)),
    ):
        with pytest.raises(ValueError, match=rf"grid={grid}.*{h}x{w}"):
            call()


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="k_mode"):
        swap_cells(4, 4, 0.5, gen(0), k_mode="all")
    with pytest.raises(ValueError, match="p"):
        swap_cells(4, 4, 1.5, gen(0))
    with pytest.raises(ValueError, match="grid"):
        swap_cells(4, 1, 0.5, gen(0))
    with pytest.raises(ValueError, match="generator"):
        swap_cells(4, 4, 0.5, gen(0), device="meta")
    xa, xb = pair(2, 0)
    with pytest.raises(ValueError, match="cells"):
        apply_swap(xa, xb, torch.zeros(2, 9, dtype=torch.bool), 4)


def test_same_seed_same_output_different_seed_differs() -> None:
    xa, xb = pair(64, 17)
    for k_mode in ("uniform", "single"):
        a1, b1 = patch_swap(xa, xb, 4, 0.5, gen(18), k_mode=k_mode)
        a2, b2 = patch_swap(xa, xb, 4, 0.5, gen(18), k_mode=k_mode)
        a3, _ = patch_swap(xa, xb, 4, 0.5, gen(19), k_mode=k_mode)
        assert torch.equal(a1, a2) and torch.equal(b1, b2)
        assert not torch.equal(a1, a3)
    assert torch.equal(swap_cells(50, 8, 0.3, gen(20)), swap_cells(50, 8, 0.3, gen(20)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_inputs_not_modified_and_outputs_do_not_alias(dtype: torch.dtype) -> None:
    xa, xb = pair(32, 21, dtype)
    ca, cb = xa.clone(), xb.clone()
    cells = swap_cells(32, 4, 1.0, gen(22))
    for fn in (apply_swap, apply_swap_loop):
        oa, ob = fn(xa, xb, cells, 4)
        assert torch.equal(xa, ca) and torch.equal(xb, cb)
        ptrs = {xa.untyped_storage().data_ptr(), xb.untyped_storage().data_ptr()}
        assert oa.untyped_storage().data_ptr() not in ptrs and ob.untyped_storage().data_ptr() not in ptrs
        oa.zero_()
        ob.zero_()
        assert torch.equal(xa, ca) and torch.equal(xb, cb)


def test_zero_swapped_pairs_and_empty_batch() -> None:
    xa, xb = pair(8, 23)
    cells = torch.zeros(8, 16, dtype=torch.bool)
    oa, ob = apply_swap(xa, xb, cells, 4)
    assert torch.equal(oa, xa) and torch.equal(ob, xb)
    ea, eb = xa[:0], xb[:0]
    assert swap_cells(0, 4, 0.5, gen(0)).shape == (0, 16)
    oa, ob = patch_swap(ea, eb, 4, 1.0, gen(0))
    assert oa.shape == (0, 3, 32, 32) and ob.shape == (0, 3, 32, 32)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_matches_loop() -> None:
    g = torch.Generator(device="cuda").manual_seed(24)
    xa, xb = (t.cuda() for t in pair(32, 25, torch.uint8))
    cells = swap_cells(32, 4, 0.5, g, device="cuda")
    assert cells.device.type == "cuda"
    oa, ob = patch_swap(xa, xb, 4, 0.5, torch.Generator(device="cuda").manual_seed(24))
    ra, rb = apply_swap_loop(xa.cpu(), xb.cpu(), cells.cpu(), 4)
    assert torch.equal(oa.cpu(), ra) and torch.equal(ob.cpu(), rb)
    with pytest.raises(ValueError, match="generator"):
        swap_cells(4, 4, 0.5, g, device="cpu")
