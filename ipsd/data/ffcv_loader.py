"""FFCV loader for ``.beton`` copies of on-disk datasets (see :mod:`ipsd.data.beton`).

Same interface and the same step layout as the torchvision :class:`~ipsd.data.folder_loader.FolderLoader`
(both are :class:`~ipsd.data.file_loader.FileLoader`): the shared EpochSampler decides each rank's anchors
and same-class partners; FFCV is handed that exact row order, one FFCV batch per step of
``local_batch x parts`` images (anchors, partners, second views), so the blocks line up with the indices
the methods receive. FFCV is used without its own sharding (``distributed=False``): ranks are already
disjoint through the sampler.

Per image, FFCV decodes the JPEG and takes the RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3, as
torchvision) in one fused step on the CPU, in ``workers`` threads; that is what makes it fast, and it is
how FFCV's own ImageNet recipe does it. The uint8 crops are moved to the training device, where the
horizontal flip (seeded, per image) and the normalisation run batched. Test images: centre crop of
224/256 of the shorter side, resized to ``image_size`` (= torchvision's Resize(S*256/224) + CenterCrop(S)).

Reproducibility: the row order, partners and flips are seeded exactly as for the other loaders; FFCV's
crop draws from numba's per-thread RNG, which cannot be seeded per image, so crops differ between runs
(resume at an epoch boundary continues the same sampling, not the same crops).

This module imports FFCV; the engine imports it only for ``loader=ffcv`` (after checking FFCV is there).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from ffcv.fields.decoders import (
    CenterCropRGBImageDecoder,
    RandomResizedCropRGBImageDecoder,
)
from ffcv.loader import Loader
from ffcv.transforms import ToDevice, ToTensor, ToTorchImage
from ffcv.traversal_order.base import TraversalOrder
from torch import Tensor

from ..rng import generator
from .beton import BetonDataset
from .file_loader import FileLoader

TEST_CROP_RATIO = 224 / 256


class FfcvLoader(FileLoader):
    def open(self, data: BetonDataset) -> None:
        self.data, self.threads = data, max(1, self.workers)
        self.train_rows = data.train_rows.numpy().astype(np.uint64)
        n = len(data.train_y)
        self._train_order = _FixedOrder(np.zeros((n - n % self.world) // self.world * self.parts, dtype=np.uint64))
        self._train = self._loader("train", self._train_order, self.local_batch * self.parts, random_crop=True)
        self._test: dict[int, Loader] = {}

    def _loader(self, split: str, order: _FixedOrder, batch_size: int, random_crop: bool):
        size = (self.size, self.size)
        decode = RandomResizedCropRGBImageDecoder(size) if random_crop else CenterCropRGBImageDecoder(size, TEST_CROP_RATIO)
        image = [decode, ToTensor()]
        if self.device.type == "cuda":  # FFCV copies on its own stream, overlapped with the next decode
            image.append(ToDevice(self.device, non_blocking=True))
        image.append(ToTorchImage(channels_last=True, convert_back_int16=False))  # NHWC memory, NCHW view
        return Loader(str(self.data.file(split)), batch_size=batch_size, num_workers=self.threads, os_cache=True,
                      order=order, distributed=False, seed=self.seed, drop_last=False,
                      pipelines={"image": image, "label": None})

    def _flip(self, x: Tensor, g: torch.Generator) -> Tensor:
        flip = torch.rand(len(x), generator=g, device=x.device) < 0.5
        return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)

    def train_blocks(self, epoch: int, steps: list[tuple[Tensor, Tensor | None]]) -> Iterator[tuple[Tensor, ...]]:
        order = torch.cat([self.step_order(idx, pidx) for idx, pidx in steps])
        self._train_order.rows = self.train_rows[order.numpy()]
        g_flip = generator(self.device, "flip", self.seed, epoch, self.rank)
        for (x,) in self._train:
            yield self._flip(x.to(self.device, non_blocking=True), g_flip).chunk(self.parts)

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's disjoint, contiguous share of the test set, centre-cropped and normalised."""
        lo, hi = self.test_range(len(self.test_y))
        if batch_size not in self._test:  # FFCV compiles a pipeline per loader: build each once
            order = _FixedOrder(self.data.test_rows[lo:hi].numpy().astype(np.uint64))
            self._test[batch_size] = self._loader("test", order, batch_size, random_crop=False)
        s = lo
        for (x,) in self._test[batch_size]:
            yield self.normalise(x), self.test_y[s : s + len(x)].to(self.device, non_blocking=True)
            s += len(x)


class _FixedOrder(TraversalOrder):
    """An FFCV traversal order that returns whatever rows we set. FFCV accepts an order *instance* and calls
    it with the loader, so the instance returns itself. ``rows`` must keep one length: FFCV sizes the epoch
    from the first order it sees."""

    def __init__(self, rows: Sequence[int]):  # FFCV's base needs a loader; ours binds in __call__
        self.rows = np.asarray(rows, dtype=np.uint64)

    def __call__(self, loader) -> _FixedOrder:
        self.loader = loader
        return self

    def sample_order(self, epoch: int) -> Sequence[int]:
        return self.rows
