"""On-device CIFAR loader: the uint8 train set lives on the training device; crop, flip,
normalisation and pair sampling are batched tensor ops (no per-sample Python). Which anchors and
partners each rank sees (also under DDP) is the EpochSampler's job.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch import Batch, Needs
from ..rng import generator
from .datasets import ImageData
from .sampler import EpochSampler

PAD = 4  # RandomCrop(32, padding=4), zero fill


class LoaderBase:
    """What every loader shares: the EpochSampler (which anchors and partners a rank sees), uint8 -> float
    normalisation on the training device, and this rank's share of the test set.

    Subclasses provide ``epoch(epoch) -> Iterator[Batch]`` and ``test_batches(batch_size)``."""

    def __init__(self, labels: Tensor, num_classes: int, mean, std, device: torch.device, batch_size: int,
                 needs: Needs, seed: int, rank: int, world: int, channels_last: bool, sampler_device="cpu"):
        self.sampler = EpochSampler(labels, num_classes, batch_size, needs, seed, rank, world, sampler_device)
        self.device, self.needs, self.seed, self.rank, self.world = torch.device(device), needs, seed, rank, world
        self.local_batch = self.sampler.local_batch
        self.channels_last = channels_last
        mean = torch.tensor(mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(std, device=self.device).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -mean / std  # x/255 normalised = x*scale + shift

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def images_per_step(self) -> int:
        return self.local_batch * self.world * self.needs.images_per_anchor

    def normalise(self, x_u8: Tensor) -> Tensor:
        """uint8 (B, C, H, W) on any device -> normalised float on the training device."""
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        # lay out the uint8 input first (4x less to move than floats); elementwise ops keep the layout
        return x_u8.to(self.device, non_blocking=True).contiguous(memory_format=layout).float() * self.scale + self.shift

    def test_range(self, n: int) -> tuple[int, int]:
        """This rank's disjoint, contiguous share [lo, hi) of ``n`` evaluation images."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def clean_train_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]] | None:
        """The training set without augmentation, for the end-of-run train accuracy; None where a loader does
        not offer it (the on-disk loaders: their record then has no clean train accuracy)."""
        return None


class DeviceLoader(LoaderBase):
    def __init__(self, data: ImageData, device: torch.device, batch_size: int, needs: Needs,
                 seed: int, rank: int = 0, world: int = 1, channels_last: bool = False):
        super().__init__(data.train_y, data.num_classes, data.mean, data.std, device, batch_size, needs, seed,
                         rank, world, channels_last, sampler_device=device)
        self.size = data.image_size
        self.train = F.pad(data.train_x.to(device), (PAD,) * 4)  # padded once, cropped per batch
        self.train_y = self.sampler.labels
        self.test_x, self.test_y = data.test_x.to(device), data.test_y.to(device)

    def augment(self, idx: Tensor, g: torch.Generator) -> Tensor:
        """Train transform of images ``idx``: random crop + flip, then normalisation."""
        return self.normalise(self.crop_flip(idx, g))

    def crop_flip(self, idx: Tensor, g: torch.Generator) -> Tensor:
        """Random 4-px-padded crop + horizontal flip of uint8 images, as one gather per batch."""
        b, s = len(idx), self.size
        off = torch.randint(0, 2 * PAD + 1, (2, b, 1), generator=g, device=self.device)
        flip = torch.rand(b, 1, generator=g, device=self.device) < 0.5
        ar = torch.arange(s, device=self.device)
        rows = off[0] + ar
        cols = off[1] + torch.where(flip, s - 1 - ar, ar)
        padded = self.train[idx].flatten(2)  # (b, C, (s + 2 PAD)^2)
        where = (rows[:, :, None] * (s + 2 * PAD) + cols[:, None, :]).view(b, 1, s * s)
        return padded.gather(2, where.expand(-1, padded.shape[1], -1)).view(b, -1, s, s)

    def strong_augment(self, idx: Tensor, g: torch.Generator) -> Tensor:
        """Crop + flip, then per-sample RandAugment and Cutout on the device (VRM's virtual view)."""
        from .randaugment import rand_augment

        return self.normalise(rand_augment(self.crop_flip(idx, g), g, **dict(self.needs.strong_args)))

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches for a 1-indexed epoch."""
        g_aug = generator(self.device, "augment", self.seed, epoch, self.rank)
        for idx, pidx in self.sampler.epoch(epoch):
            batch = Batch(x=self.augment(idx, g_aug), y=self.train_y[idx], index=idx)
            if pidx is not None:
                batch.partner, batch.partner_index = self.augment(pidx, g_aug), pidx
            if self.needs.views == 2:
                batch.view2 = self.strong_augment(idx, g_aug) if self.needs.strong_view2 else self.augment(idx, g_aug)
            yield batch

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's disjoint share of the test set, normalised, no augmentation."""
        return self._plain_batches(self.test_x, self.test_y, batch_size)

    def clean_train_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's disjoint share of the training set as stored (no crop, flip or pairing), normalised."""
        return self._plain_batches(self.train[:, :, PAD:-PAD, PAD:-PAD], self.train_y, batch_size)

    def _plain_batches(self, x: Tensor, y: Tensor, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        lo, hi = self.test_range(len(y))
        for s in range(lo, hi, batch_size):
            e = min(s + batch_size, hi)
            yield self.normalise(x[s:e]), y[s:e]
