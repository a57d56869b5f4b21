"""What the two loaders of on-disk datasets share (torchvision folders, FFCV ``.beton`` files).

Each step's images are decoded as one flat list: the anchors, then their same-class partners (pair
methods), then the anchors again for an independently augmented second view (two-view methods). A
backend only has to turn that list into uint8 crops and split them into ``parts`` equal blocks; how the
blocks become a :class:`~ipsd.method.Batch` (normalisation, the strong second view) is done here, once.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .batch import Batch, Needs
from ..rng import generator
from .loader import LoaderBase


class FileLoader(LoaderBase):
    def __init__(self, data, device: torch.device, batch_size: int, needs: Needs, seed: int, rank: int = 0,
                 world: int = 1, channels_last: bool = False, image_size: int = 224, workers: int = 8):
        if image_size < 1 or workers < 0:
            raise ValueError(f"image_size={image_size} must be >= 1 and workers={workers} >= 0")
        super().__init__(data.train_y, data.num_classes, data.mean, data.std, device, batch_size, needs, seed,
                         rank, world, channels_last)
        self.size, self.workers = image_size, workers
        self.train_y = data.train_y.to(self.device)
        self.test_y = data.test_y
        self.open(data)

    def open(self, data) -> None:
        """Set up the backend's readers of ``data`` (called once, at the end of ``__init__``)."""
        raise NotImplementedError

    @property
    def parts(self) -> int:
        """Blocks per step: anchors, [partners], [second views]."""
        return 1 + int(self.needs.pairs) + int(self.needs.views == 2)

    def step_order(self, idx: Tensor, pidx: Tensor | None) -> Tensor:
        """Dataset indices to decode for one step, in block order."""
        second = [idx] if self.needs.views == 2 else []
        return torch.cat([idx, *([pidx] if pidx is not None else []), *second])

    def train_blocks(self, epoch: int, steps: list[tuple[Tensor, Tensor | None]]) -> Iterator[tuple[Tensor, ...]]:
        """Per step, ``parts`` uint8 (B, C, S, S) blocks of the augmented crops (the backend's job)."""
        raise NotImplementedError

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches for a 1-indexed epoch."""
        steps = list(self.sampler.epoch(epoch))  # index tensors only; images are decoded lazily
        g_strong = generator(self.device, "augment", self.seed, epoch, self.rank) if self.needs.strong_view2 else None
        for (idx, pidx), blocks in zip(steps, self.train_blocks(epoch, steps)):
            idx_d = idx.to(self.device, non_blocking=True)
            batch = Batch(x=self.normalise(blocks[0]), y=self.train_y[idx_d], index=idx_d)
            if pidx is not None:
                batch.partner = self.normalise(blocks[1])
                batch.partner_index = pidx.to(self.device, non_blocking=True)
            if self.needs.views == 2:
                view2 = blocks[-1]
                if self.needs.strong_view2:
                    from .randaugment import rand_augment

                    view2 = rand_augment(view2.to(self.device, non_blocking=True), g_strong,
                                         **dict(self.needs.strong_args))
                batch.view2 = self.normalise(view2)
            yield batch
