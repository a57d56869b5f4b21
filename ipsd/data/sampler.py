"""Which anchors (and same-class partners) each rank sees at each step: shared by every loader.

Every rank draws the same epoch permutation and takes a strided, disjoint share of it (the last
``N % world`` anchors of each permutation are dropped), so that the union of the ranks' step-k
batches is exactly the single-process step-k batch. Partners are drawn for the whole permutation
with the same generator, so they agree across ranks too.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .batch import Needs
from ..rng import generator


class EpochSampler:
    def __init__(self, labels: Tensor, num_classes: int, batch_size: int, needs: Needs, seed: int,
                 rank: int = 0, world: int = 1, device: torch.device | str = "cpu"):
        if batch_size % world:
            raise ValueError(f"batch_size={batch_size} must be divisible by the world size {world}")
        self.labels = labels.to(device)
        self.n, self.needs, self.seed, self.device = len(labels), needs, seed, torch.device(device)
        self.rank, self.world, self.local_batch = rank, world, batch_size // world
        if batch_size > self.n:
            raise ValueError(f"batch_size={batch_size} is larger than the training set ({self.n} images)")
        # class -> contiguous block of `by_class`; `slot[i]` = position of sample i inside its block
        self.by_class = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels, minlength=num_classes)
        self.class_start, self.class_count = torch.cumsum(counts, 0) - counts, counts
        self.slot = torch.empty_like(self.by_class)
        self.slot[self.by_class] = torch.arange(self.n, device=self.device) - self.class_start[self.labels[self.by_class]]
        if needs.pairs and not needs.self_pairs and int(counts[counts > 0].min()) < 2:
            raise ValueError("pair sampling without self-pairs needs at least 2 training images per class")

    def __len__(self) -> int:
        return -(-(self.n // self.world) // self.local_batch)

    def partners(self, anchors: Tensor, g: torch.Generator) -> Tensor:
        """For each anchor, a uniformly drawn index of the same class (excluding itself unless allowed)."""
        y = self.labels[anchors]
        count = self.class_count[y]
        choices = count if self.needs.self_pairs else count - 1
        r = torch.minimum((torch.rand(len(anchors), generator=g, device=self.device) * choices).long(), choices - 1)
        if not self.needs.self_pairs:
            r = r + (r >= self.slot[anchors]).long()  # skip the anchor's own slot
        return self.by_class[self.class_start[y] + r]

    def epoch(self, epoch: int) -> Iterator[tuple[Tensor, Tensor | None]]:
        """This rank's (anchor indices, partner indices or None) per step of a 1-indexed epoch."""
        g = generator(self.device, "sampler", self.seed, epoch)  # identical on all ranks
        perm = torch.randperm(self.n, generator=g, device=self.device)
        partner = self.partners(perm, g) if self.needs.pairs else None
        shard = slice(self.rank, self.n - self.n % self.world, self.world)
        mine = perm[shard]
        mine_partner = partner[shard] if partner is not None else None
        for s in range(0, len(mine), self.local_batch):
            yield mine[s : s + self.local_batch], (mine_partner[s : s + self.local_batch]
                                                   if mine_partner is not None else None)
