"""Intra-class patch swap (IPS): exchange whole grid cells between paired images.

Grid semantics: ``grid = n`` cuts an H×W image into n×n non-overlapping cells of
(H/n)×(W/n) pixels; cell ``c`` is row ``c // n``, column ``c % n`` (row-major). The paper's
"4×4 patches" is this 4×4 grid (16 cells of 8 px on CIFAR), not patches of 4 px.
Every swap goes through fresh tensors built with ``torch.where``, never through views (a tuple
swap through indexed views can copy one image's cell into both), and unswapped pairs pass
through unchanged into the same loss (the paper's snippet, read literally, would drop them).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

__all__ = ["K_MODES", "swap_cells", "apply_swap", "patch_swap", "apply_swap_loop"]

K_MODES: tuple[str, ...] = ("uniform", "single")
DeviceLike = Union[str, torch.device, None]


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Device equality where a missing CUDA index ("cuda") matches the current one."""
    if a.type != b.type:
        return False
    if a.index is None or b.index is None:
        if a.type != "cuda":
            return True
        cur = torch.cuda.current_device()
        return (a.index if a.index is not None else cur) == (b.index if b.index is not None else cur)
    return a.index == b.index


def swap_cells(
    batch: int,
    grid: int,
    p: float,
    generator: torch.Generator,
    device: DeviceLike = None,
    k_mode: str = "uniform",
) -> Tensor:
    """Bool ``(batch, grid*grid)``: the cells each pair exchanges (all False for unswapped pairs).

    Each pair is swapped with probability ``p`` (independent Bernoulli per pair, not per batch).
    A swapped pair exchanges ``k`` cells, ``k ~ Uniform{1..grid²-1}`` (``"uniform"``, the paper's
    prose: at least one, at most grid²-1) or ``k = 1`` (``"single"``, a literal reading of the
    trailing ``[0]`` in the paper's snippet); the cells are a uniformly random k-subset, obtained
    by ranking iid uniform scores and keeping the k smallest ranks (exactly k even under ties, no
    loop over the batch).
    The same three draws are made whatever ``p`` is, so a seed fixes the stream per shape.
    """
    if k_mode not in K_MODES:
        raise ValueError(f"k_mode must be one of {K_MODES}, got {k_mode!r}")
    if not isinstance(grid, int) or grid < 2:
        raise ValueError(f"grid must be an int >= 2 (a 1x1 grid leaves no k in 1..grid²-1), got {grid!r}")
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"swap probability p must be in [0, 1], got {p!r}")
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    gen_dev = generator.device
    dev = gen_dev if device is None else torch.device(device)
    if not _same_device(dev, gen_dev):
        raise ValueError(f"generator is on {gen_dev} but cells were requested on {dev}; they must match")

    cells = grid * grid
    # rand in [0, 1): p=1 swaps every pair, p=0 none.
    swapped = torch.rand(batch, generator=generator, device=dev) < float(p)
    if k_mode == "uniform":
        k = torch.randint(1, cells, (batch,), generator=generator, device=dev)
    else:
        k = torch.ones(batch, dtype=torch.long, device=dev)
    scores = torch.rand(batch, cells, generator=generator, device=dev)
    ranks = scores.argsort(dim=1).argsort(dim=1)  # a random permutation of 0..cells-1 per row
    return (ranks < k[:, None]) & swapped[:, None]


def _check(xa: Tensor, xb: Tensor, grid: int) -> tuple[int, int]:
    """Validate a pair of batches against the grid; return the cell size (Sh, Sw)."""
    if xa.dim() != 4 or xa.shape != xb.shape:
        raise ValueError(f"xa and xb must both be (B, C, H, W) with equal shapes, got {tuple(xa.shape)} and {tuple(xb.shape)}")
    if xa.dtype != xb.dtype or xa.device != xb.device:
        raise ValueError(f"xa and xb must share dtype and device, got {xa.dtype}/{xa.device} and {xb.dtype}/{xb.device}")
    h, w = xa.shape[-2:]
    if not isinstance(grid, int) or grid < 1 or h % grid or w % grid:
        raise ValueError(f"grid={grid!r} must divide the image size {h}x{w} (H and W both)")
    return h // grid, w // grid


def _check_cells(cells: Tensor, batch: int, grid: int) -> None:
    if cells.dtype != torch.bool or cells.shape != (batch, grid * grid):
        raise ValueError(
            f"cells must be bool of shape ({batch}, {grid * grid}) for grid={grid}, "
            f"got {cells.dtype} {tuple(cells.shape)}"
        )


_UNITS: tuple[torch.dtype, ...] = (torch.int64, torch.int32, torch.int16)


def _as_units(x: Tensor, row_bytes: int) -> Optional[Tensor]:
    """Reinterpret ``x`` as the widest integer dtype that still tiles one cell row exactly.

    ``torch.where`` on CPU costs roughly per element, so selecting 8-byte words instead of
    1-byte uint8 pixels (or 4-byte floats) is several times faster; a pure bit copy is exact
    for every dtype. ``None`` when no wider view applies (autograd, odd strides or sizes).
    """
    isz = x.element_size()
    if x.requires_grad or x.dim() != 4 or x.stride(-1) != 1:
        return None
    for d in _UNITS:
        n = torch.empty((), dtype=d).element_size()
        if n <= isz or row_bytes % n:
            continue
        try:
            return x.view(d)
        except RuntimeError:  # misaligned storage offset or strides
            continue
    return None


def apply_swap(xa: Tensor, xb: Tensor, cells: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Exchange the marked cells between ``xa`` and ``xb`` at the same location; new tensors out.

    Vectorised: the cell mask is expanded to a (B, 1, H, W') pixel mask that broadcasts over
    channels, and each output is one ``torch.where`` (exact, never aliases the inputs).
    When possible the images are viewed as wide integer words (``W'`` < W) for speed.
    """
    sh, sw = _check(xa, xb, grid)
    b, _, h, w = xa.shape
    _check_cells(cells, b, grid)
    ua, ub = _as_units(xa, sw * xa.element_size()), _as_units(xb, sw * xb.element_size())
    if ua is None or ub is None or ua.dtype != ub.dtype:
        ua, ub = xa, xb
    u = ua.shape[-1] // grid  # words per cell row
    m = cells.to(xa.device).view(b, 1, grid, 1, grid, 1).expand(b, 1, grid, sh, grid, u).reshape(b, 1, h, grid * u)
    out_a, out_b = torch.where(m, ub, ua), torch.where(m, ua, ub)
    if ua is not xa:
        out_a, out_b = out_a.view(xa.dtype), out_b.view(xa.dtype)
    return out_a, out_b


def patch_swap(
    xa: Tensor,
    xb: Tensor,
    grid: int,
    p: float,
    generator: torch.Generator,
    k_mode: str = "uniform",
) -> tuple[Tensor, Tensor]:
    """Draw cells with :func:`swap_cells` and apply them (the training-time operator)."""
    _check(xa, xb, grid)  # fail before consuming randomness
    cells = swap_cells(xa.shape[0], grid, p, generator, device=xa.device, k_mode=k_mode)
    return apply_swap(xa, xb, cells, grid)


def apply_swap_loop(xa: Tensor, xb: Tensor, cells: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Reference/oracle: per-sample, per-cell Python loop with the paper snippet's semantics.

    Patch side S = W // grid (H // grid vertically, identical for square images); each block
    is copied with ``.clone()`` from the *original* inputs, so the exchange cannot alias.
    """
    sh, sw = _check(xa, xb, grid)
    b = xa.shape[0]
    _check_cells(cells, b, grid)
    out_a, out_b = xa.clone(), xb.clone()
    for i, row in enumerate(cells.tolist()):
        for c, hit in enumerate(row):
            if not hit:
                continue
            y0, x0 = (c // grid) * sh, (c % grid) * sw
            patch_a = xa[i, :, y0 : y0 + sh, x0 : x0 + sw].clone()
            patch_b = xb[i, :, y0 : y0 + sh, x0 : x0 + sw].clone()
            out_a[i, :, y0 : y0 + sh, x0 : x0 + sw] = patch_b
            out_b[i, :, y0 : y0 + sh, x0 : x0 + sw] = patch_a
    return out_a, out_b
