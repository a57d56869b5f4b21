"""Batched, on-device RandAugment + Cutout on uint8 images (VRM's virtual view).

Every sample draws its own ``n`` operations (uniformly, with replacement, as ``random.choices``) and a
magnitude per operation, then one Cutout square; all of it is vectorised over the batch (a loop over
the ``n`` op slots and the 14 op kinds, never over samples) and every random number comes from the
caller's ``torch.Generator`` (on the batch's device), so a batch is a pure function of (images, generator
state). No host/device synchronisation: each kind is computed for the whole batch with per-sample
parameters and selected with ``torch.where``.

``variant="fixmatch"`` (default) follows the CRLD lineage that VRM's virtual view is inferred from
(scx-822/CRLD-main ``mdistiller/dataset/cifar100.py``: a FixMatch-style ``RandAugment(2, 10)`` on PIL images
after crop+flip). Per op, a value ``d`` is drawn uniformly from the op's range:

    AutoContrast, Equalize, Identity   no parameter
    Brightness, Color, Contrast, Sharpness   enhancement factor d in [0.05, 0.95]  (PIL ImageEnhance)
    Posterize   bits = int(d), d in [4, 8]        Solarize   threshold d in [0, 256] (x >= d inverted)
    Rotate   d in [-30, 30] degrees (counter-clockwise about the centre)
    ShearX/Y   d in [-0.3, 0.3]  (PIL affine (1, d, 0, 0, 1, 0) / (1, 0, 0, d, 1, 0): about the top-left corner)
    TranslateX/Y   d in [-0.3, 0.3] of the width/height (input = output + d*W)

CRLD ignores RandAugment's ``m`` (its ranges are fixed); here ``magnitude`` m in [0, 10] moves every drawn
value towards the op's identity, ``v = identity + (d - identity) * m / 10`` (identity: factor 1, 0 degrees /
shear / shift, 8 bits, threshold 256), so m = 10 is exactly CRLD and m = 0 leaves images unchanged.

Cutout (CRLD ``Cutout(img, U(0, 0.5))``): side ``s = v * W`` with v ~ U(0, cutout); a centre (cx, cy) uniform
on the image; ``x0 = floor(max(0, cx - s/2))`` and PIL's inclusive rectangle covers columns
``x0 <= x <= x0 + s`` (clipped at the right edge; rows alike, and note CRLD's asymmetry: a box is clipped at
the right/bottom edges only, a box near the left/top edge is shifted inside instead); nothing when v = 0. Fill
``(125, 123, 114)`` (CRLD's colour, about the CIFAR mean; FixMatch-pytorch uses gray 127).

``variant="torchvision"`` is the other reading of VRM's "RandAugment", ``torchvision.transforms.RandAugment(num_ops=2,
magnitude=9)``: the same 14 ops with torchvision's fixed magnitude for bin ``m`` of 31 (shear 0.3 m/30, translate
int(150/331 W m/30) px, rotate m degrees, enhance factor 1 +- 0.9 m/30 -- random sign --, posterize
8 - round(m/7.5) bits, solarize threshold 255 (1 - m/30)); torchvision applies no Cutout (pass ``cutout=0``).

Pixel semantics mirror PIL (the library CRLD runs): geometric ops sample the input at ``floor`` of the mapped
pixel centre (PIL's NEAREST), fill 0 outside; enhancements blend in float and truncate; Color/Contrast use
PIL's integer luma ``(19595 R + 38470 G + 7471 B + 2^15) >> 16``; Sharpness uses PIL's SMOOTH kernel
(1 1 1 / 1 5 1 / 1 1 1)/13 with the border pixels kept; Equalize and AutoContrast are PIL's per-channel LUTs.
A test checks every op against PIL on single images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

OPS: tuple[str, ...] = ("AutoContrast", "Brightness", "Color", "Contrast", "Equalize", "Identity", "Posterize",
                        "Rotate", "Sharpness", "ShearX", "ShearY", "Solarize", "TranslateX", "TranslateY")
OP = {name: i for i, name in enumerate(OPS)}
GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
ENHANCE = ("Brightness", "Color", "Contrast", "Sharpness")
# CRLD ranges (lo, hi) of the drawn value and the value that leaves an image unchanged
RANGES: dict[str, tuple[float, float, float]] = {
    "Brightness": (0.05, 0.95, 1.0), "Color": (0.05, 0.95, 1.0), "Contrast": (0.05, 0.95, 1.0),
    "Sharpness": (0.05, 0.95, 1.0), "Posterize": (4.0, 8.0, 8.0), "Rotate": (-30.0, 30.0, 0.0),
    "ShearX": (-0.3, 0.3, 0.0), "ShearY": (-0.3, 0.3, 0.0), "Solarize": (0.0, 256.0, 256.0),
    "TranslateX": (-0.3, 0.3, 0.0), "TranslateY": (-0.3, 0.3, 0.0),
}
CUTOUT_FILL = (125, 123, 114)
VARIANTS = ("fixmatch", "torchvision")
MAX_MAGNITUDE = {"fixmatch": 10, "torchvision": 30}


def rand_augment(x: Tensor, generator: torch.Generator, n: int = 2, magnitude: int = 10, cutout: float = 0.5,
                 variant: str = "fixmatch", fill: tuple[int, int, int] = CUTOUT_FILL) -> Tensor:
    """RandAugment(n, magnitude) then Cutout (side up to ``cutout`` of the image) on a uint8 batch (B, 3, H, W).

    Returns a new uint8 batch on the same device. The random draws (and their order) depend only on the
    batch shape, never on the pixels, so the generator advances identically for every batch of a shape.
    """
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"rand_augment needs a uint8 (B, 3, H, W) batch, got {tuple(x.shape)} {x.dtype}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; use one of {VARIANTS}")
    if not 0 <= magnitude <= MAX_MAGNITUDE[variant]:
        raise ValueError(f"magnitude={magnitude} is out of range [0, {MAX_MAGNITUDE[variant]}] for {variant}")
    if n < 0 or not 0 <= cutout <= 1:
        raise ValueError(f"n={n} must be >= 0 and cutout={cutout} in [0, 1]")
    b, _, h, w = x.shape
    dev = x.device
    ops = torch.randint(len(OPS), (b, n), generator=generator, device=dev)
    u = torch.rand(b, n, generator=generator, device=dev)
    sign = torch.rand(b, n, generator=generator, device=dev) < 0.5
    cut = torch.rand(b, 3, generator=generator, device=dev)  # side fraction, centre x, centre y
    values = op_values(ops, u, sign, magnitude, variant, w)
    y = x.float()
    for k in range(n):
        y = apply_ops(y, ops[:, k], values[:, k])
    if cutout > 0:
        y = cutout_boxes(y, cut[:, 0] * cutout * w, cut[:, 1] * w, cut[:, 2] * h, fill)
    return y.to(torch.uint8)


def op_values(ops: Tensor, u: Tensor, sign: Tensor, magnitude: float, variant: str, width: int) -> Tensor:
    """Per-(sample, slot) parameter of the drawn op, from uniforms ``u`` (and random signs for torchvision)."""
    v = torch.zeros_like(u)
    if variant == "fixmatch":
        s = magnitude / 10.0
        for name, (lo, hi, ident) in RANGES.items():
            d = lo + (hi - lo) * u
            val = ident + (d - ident) * s
            if name == "Posterize":
                val = val.floor().clamp(min=1.0)
            v = torch.where(ops == OP[name], val, v)
        return v
    frac = magnitude / 30.0
    sgn = torch.where(sign, -1.0, 1.0)
    fixed = {"ShearX": 0.3 * frac, "ShearY": 0.3 * frac, "Rotate": 30.0 * frac,
             "TranslateX": math.floor(150.0 / 331.0 * width * frac) / width,
             "TranslateY": math.floor(150.0 / 331.0 * width * frac) / width}
    for name, val in fixed.items():
        v = torch.where(ops == OP[name], sgn * val, v)
    for name in ENHANCE:
        v = torch.where(ops == OP[name], 1.0 + sgn * 0.9 * frac, v)
    v = torch.where(ops == OP["Posterize"], torch.full_like(v, 8 - round(magnitude / 7.5)), v)
    v = torch.where(ops == OP["Solarize"], torch.full_like(v, 255.0 * (1 - frac)), v)
    return v


def apply_ops(y: Tensor, ops: Tensor, values: Tensor, subset: bool | None = None) -> Tensor:
    """Sample i of float batch ``y`` (integer values 0..255) gets op ``OPS[ops[i]]`` with parameter ``values[i]``.

    Every op acts on each sample alone, so two equivalent schedules exist: ``subset`` computes each op only on
    the samples that drew it (least work, but indexing by a mask waits for the device), the other computes
    every op on the whole batch and selects with ``torch.where`` (no host/device synchronisation, so a GPU
    loader never stalls the queue). Default: subsets on the CPU, ``where`` elsewhere. Results are identical.
    """
    b = len(y)
    if subset is None:
        subset = y.device.type == "cpu"
    out = y.clone() if subset else y
    for names, fn in _GROUPS:
        chosen = torch.zeros_like(ops, dtype=torch.bool)
        for name in names:
            chosen |= ops == OP[name]
        if subset:
            idx = chosen.nonzero().squeeze(1)
            if len(idx):
                out[idx] = fn(y[idx], ops[idx], values[idx])
        else:
            out = torch.where(chosen.view(b, 1, 1, 1), fn(y, ops, values), out)
    return out


def _geometric(y: Tensor, ops: Tensor, values: Tensor) -> Tensor:
    return _affine_nearest(y, _affine_matrices(ops, values.double(), y.shape[3], y.shape[2]))


def _contrast(y: Tensor, factor: Tensor) -> Tensor:
    """PIL: blend with the image's mean luma, rounded to an integer."""
    mean = torch.floor(_luma(y).mean((1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(y), y, factor)


def _per_sample(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


# (op names, fn(images, ops, values)) -- the geometric ops share one batched gather; Identity is absent
_GROUPS = (
    (GEOMETRIC, _geometric),
    (("AutoContrast",), lambda y, o, v: _autocontrast(y)),
    (("Brightness",), lambda y, o, v: _blend(torch.zeros_like(y), y, _per_sample(v))),
    (("Color",), lambda y, o, v: _blend(_luma(y).expand_as(y), y, _per_sample(v))),
    (("Contrast",), lambda y, o, v: _contrast(y, _per_sample(v))),
    (("Equalize",), lambda y, o, v: _equalize(y)),
    (("Posterize",), lambda y, o, v: _posterize(y, _per_sample(v))),
    (("Sharpness",), lambda y, o, v: _blend(_smooth(y), y, _per_sample(v))),
    (("Solarize",), lambda y, o, v: torch.where(y < _per_sample(v), y, 255.0 - y)),
)


def _blend(degenerate: Tensor, image: Tensor, factor: Tensor) -> Tensor:
    """PIL ``Image.blend(degenerate, image, factor)``: interpolate/extrapolate, clip, truncate."""
    return (degenerate + factor * (image - degenerate)).clamp(0, 255).floor()


def _luma(y: Tensor) -> Tensor:
    """PIL's RGB -> L conversion (fixed point, exact in float32): (B, 1, H, W)."""
    r, g, b = y[:, 0:1], y[:, 1:2], y[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _smooth(y: Tensor) -> Tensor:
    """PIL ImageFilter.SMOOTH (3x3 kernel, centre 5, scale 13), rounded; border pixels unchanged."""
    k = torch.ones(3, 3, device=y.device, dtype=y.dtype)
    k[1, 1] = 5
    k = (k / 13).expand(3, 1, 3, 3)
    inner = torch.floor(F.conv2d(y, k, groups=3) + 0.5).clamp(0, 255)
    out = y.clone()
    out[:, :, 1:-1, 1:-1] = inner
    return out


def _posterize(y: Tensor, bits: Tensor) -> Tensor:
    """Keep the top ``bits`` bits of every channel value."""
    q = torch.exp2(8 - bits)
    return torch.floor(y / q) * q


def _autocontrast(y: Tensor) -> Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0): stretch each channel's [min, max] to [0, 255]."""
    lo = y.amin((2, 3), keepdim=True).double()
    hi = y.amax((2, 3), keepdim=True).double()
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp(min=1)  # tensor/tensor: correctly rounded like Python
    stretched = torch.floor(y.double() * scale - lo * scale).clamp(0, 255).to(y.dtype)  # PIL's double LUT
    return torch.where(hi > lo, stretched, y)


def _equalize(y: Tensor) -> Tensor:
    """PIL ``ImageOps.equalize`` per channel via batched histograms: lut[i] = (step//2 + #pixels < i) // step,
    step = (#pixels - count of the highest occurring value) // 255; identity when step is 0."""
    b, c, h, w = y.shape
    flat = y.view(b * c, h * w).long()
    offset = torch.arange(b * c, device=y.device).view(-1, 1) * 256
    keys = (flat + offset).view(-1)  # scatter_add_, not bincount: bincount reads the max on the host (a GPU sync)
    hist = torch.zeros(b * c * 256, dtype=torch.long, device=y.device).scatter_add_(0, keys, torch.ones_like(keys))
    hist = hist.view(b * c, 256)
    top = 255 - (hist.flip(1) > 0).long().argmax(1, keepdim=True)  # highest value present
    step = (h * w - hist.gather(1, top)) // 255
    below = torch.cumsum(hist, 1) - hist
    lut = torch.clamp((step // 2 + below) // step.clamp(min=1), max=255)
    lut = torch.where(step > 0, lut, torch.arange(256, device=y.device).expand_as(lut))
    return lut.gather(1, flat).view(b, c, h, w).to(y.dtype)


def _affine_matrices(ops: Tensor, values: Tensor, w: int, h: int) -> Tensor:
    """(B, 2, 3) maps from an output pixel position to its input position (pixel-edge coordinates, origin at
    the top-left corner): PIL's affine data for each geometric op; the identity for the others."""
    one, zero = torch.ones_like(values), torch.zeros_like(values)
    a, b_, c, d, e, f = one, zero, zero, zero, one, zero

    def pick(name: str, cur: Tensor, new: Tensor) -> Tensor:
        return torch.where(ops == OP[name], new, cur)

    # Rotate (PIL Image.rotate, counter-clockwise, about (W/2, H/2)): angle a = -radians(v)
    t = -torch.deg2rad(values)
    cos, sin = torch.cos(t), torch.sin(t)
    cx, cy = w / 2.0, h / 2.0
    a, b_, d, e = pick("Rotate", a, cos), pick("Rotate", b_, sin), pick("Rotate", d, -sin), pick("Rotate", e, cos)
    c = pick("Rotate", c, cx - cos * cx - sin * cy)
    f = pick("Rotate", f, cy + sin * cx - cos * cy)
    b_ = pick("ShearX", b_, values)
    d = pick("ShearY", d, values)
    c = pick("TranslateX", c, values * w)
    f = pick("TranslateY", f, values * h)
    return torch.stack([torch.stack([a, b_, c], 1), torch.stack([d, e, f], 1)], 1)


def _affine_nearest(y: Tensor, m: Tensor) -> Tensor:
    """One batched gather: output pixel (x, y) takes input pixel floor(M @ (x + 0.5, y + 0.5, 1)), 0 outside.
    ``m`` is float64 (as PIL's double arithmetic), so floors land on the same pixels on every device.

    (``grid_sample(mode="nearest")`` rounds half to even instead of PIL's floor; an explicit gather keeps PIL's
    rule and integer pixel values.)
    """
    b, c, h, w = y.shape
    xs = torch.arange(w, device=y.device, dtype=m.dtype) + 0.5
    ys = torch.arange(h, device=y.device, dtype=m.dtype) + 0.5
    u = m[:, 0, 0, None, None] * xs + m[:, 0, 1, None, None] * ys[:, None] + m[:, 0, 2, None, None]
    v = m[:, 1, 0, None, None] * xs + m[:, 1, 1, None, None] * ys[:, None] + m[:, 1, 2, None, None]
    ix, iy = torch.floor(u).long(), torch.floor(v).long()
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    index = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).view(b, 1, h * w).expand(-1, c, -1)
    out = y.reshape(b, c, h * w).gather(2, index).view(b, c, h, w)
    return torch.where(inside.view(b, 1, h, w), out, torch.zeros((), device=y.device, dtype=y.dtype))


def cutout_boxes(y: Tensor, side: Tensor, cx: Tensor, cy: Tensor, fill: tuple[int, int, int] = CUTOUT_FILL) -> Tensor:
    """CRLD's CutoutAbs per sample: a square of side ``side`` px, top-left ``floor(max(0, c - side/2))``,
    PIL-inclusive right/bottom edge ``x0 + side`` (clipped to the image), filled with ``fill``; none if side = 0."""
    b, _, h, w = y.shape
    x0 = torch.floor((cx - side / 2).clamp(min=0)).view(b, 1, 1)
    y0 = torch.floor((cy - side / 2).clamp(min=0)).view(b, 1, 1)
    s = side.view(b, 1, 1)
    cols = torch.arange(w, device=y.device, dtype=y.dtype).view(1, 1, w)
    rows = torch.arange(h, device=y.device, dtype=y.dtype).view(1, h, 1)
    box = (cols >= x0) & (cols <= x0 + s) & (rows >= y0) & (rows <= y0 + s) & (s > 0)
    colour = torch.tensor(fill, device=y.device, dtype=y.dtype).view(1, 3, 1, 1)
    return torch.where(box[:, None], colour, y)
