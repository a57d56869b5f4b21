"""Seeded random streams.

Every stream (sampler, augmentation, method) is re-seeded at the start of each epoch from
(run seed, epoch, stream, rank). A checkpoint taken at an epoch boundary therefore pins every
generator's state through the epoch number alone, so a resumed run draws exactly what an
uninterrupted one would, on any number of restarts.
"""
from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any tuple of parts (stable across processes and Python versions)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def generator(device: torch.device | str, *parts: object) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(derive_seed(*parts))
    return g
