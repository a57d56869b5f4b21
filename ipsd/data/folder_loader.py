"""Torchvision fallback loader for on-disk datasets (ImageNet, CUB-200, Stanford Dogs, class folders).

Same interface as :class:`ipsd.data.loader.DeviceLoader` (``epoch``, ``test_batches``, ``__len__``,
``images_per_step``, ``device``, ``local_batch``, ``needs``), so the engine trains on a
:class:`~ipsd.data.folders.FileDataset` unchanged. Which anchors and partners a rank sees at each step is
the shared :class:`~ipsd.data.sampler.EpochSampler`'s job, exactly as for the in-memory loader.

Pipeline per step: the sampler's anchor indices (then the partners, then the anchors again for a second
view) form one list; a torch ``DataLoader`` whose ``batch_sampler`` yields these lists decodes each file
with PIL (``convert("RGB")``) in worker processes and applies the train transform
``RandomResizedCrop(image_size)`` + ``RandomHorizontalFlip``; the collate stacks the uint8 crops and splits
them into anchors / partners / second views. ``ToTensor`` + ``Normalize(mean, std)`` is done on the
training device, batched (``x * 1/(255 std) - mean/std``, as DeviceLoader does): the host ships uint8 (4x less
traffic than floats), and the values equal the per-image torchvision normalisation up to float rounding.
Test images: ``Resize(int(image_size * 256 / 224))`` + ``CenterCrop(image_size)``, the same normalisation.

Reproducibility. Each image slot of a step gets its own seed, ``derive_seed("augment", seed, epoch, rank,
step) + slot``, and its crop and flip are drawn from the CPU torch generator re-seeded with it, in whichever
process decodes it (inside ``torch.random.fork_rng`` so the training process's own CPU RNG is left as it
was when ``workers=0``; CUDA generators are never touched). Hence, for a given (seed, epoch, rank, world,
batch size, dataset, image_size):

* the sampled indices, the crops and flips, and therefore the uint8 images of every batch are exactly
  the same whatever ``workers`` is (0 included), across restarts and on resume at an epoch boundary,
  with the same torch / torchvision / Pillow versions (a different Pillow may decode or resize a JPEG
  to slightly different pixels);
* the strong second view (``strong_view2``: RandAugment + Cutout on the uint8 crops, on the device) draws
  from ``generator(device, "augment", seed, epoch, rank)`` like DeviceLoader: exact on CPU, and on
  CUDA as reproducible as those kernels are;
* the float batches match to float rounding across devices; what training then does with them on a GPU is
  bitwise reproducible only with ``deterministic=true`` (and not always even then).

Epochs differ in their augmentation because the epoch is part of every seed.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..method import Batch, Needs
from ..rng import derive_seed, generator
from .datasets import subset_selection
from .folders import FileDataset
from .sampler import EpochSampler

SEED_MOD = 2**63


def _transforms(image_size: int):
    from torchvision import transforms as T

    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
    test = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.PILToTensor()])
    return train, test


def _open_rgb(path) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


class _TrainImages(Dataset):
    """Items are ``(dataset index, seed)``: the image decoded and augmented with that seed, as uint8 (3, S, S)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> Tensor:
        index, seed = item
        image = _open_rgb(self.paths[index])
        with torch.random.fork_rng(devices=[]):  # only the CPU generator, restored afterwards
            torch.default_generator.manual_seed(seed)
            return self.transform(image)


class _TestImages(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return self.transform(_open_rgb(self.paths[index]))


class _SplitCollate:
    """Stack a step's images and split them into ``parts`` equal blocks (anchors, partners, second views)."""

    def __init__(self, parts: int):
        self.parts = parts

    def __call__(self, images: list[Tensor]) -> tuple[Tensor, ...]:
        return torch.stack(images).chunk(self.parts)


class FolderLoader:
    def __init__(self, data: FileDataset, device: torch.device, batch_size: int, needs: Needs, seed: int,
                 rank: int = 0, world: int = 1, channels_last: bool = False, image_size: int = 224,
                 workers: int = 8):
        if image_size < 1 or workers < 0:
            raise ValueError(f"image_size={image_size} must be >= 1 and workers={workers} >= 0")
        self.sampler = EpochSampler(data.train_y, data.num_classes, batch_size, needs, seed, rank, world, "cpu")
        self.device, self.needs, self.seed, self.rank, self.world = torch.device(device), needs, seed, rank, world
        self.local_batch = self.sampler.local_batch
        self.channels_last, self.size, self.workers = channels_last, image_size, workers
        self.pin = self.device.type == "cuda"
        train_tf, test_tf = _transforms(image_size)
        self.train_set = _TrainImages(list(data.train_paths), train_tf)
        self.test_set = _TestImages(list(data.test_paths), test_tf)
        self.train_y = data.train_y.to(self.device)
        self.test_y = data.test_y
        mean = torch.tensor(data.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(data.std, device=self.device).view(1, -1, 1, 1)
        self.scale, self.shift = 1 / (255 * std), -mean / std

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def images_per_step(self) -> int:
        return self.local_batch * self.world * self.needs.images_per_anchor

    def normalise(self, x_u8: Tensor) -> Tensor:
        x = x_u8.to(self.device, non_blocking=True).float() * self.scale + self.shift
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _loader(self, dataset: Dataset, batch_sampler, parts: int) -> DataLoader:
        # Workers need no seeding of their own (each image has its own seed); the dedicated generator
        # only keeps the DataLoader from drawing its worker base seed from the global torch RNG.
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.workers,
                          collate_fn=_SplitCollate(parts), pin_memory=self.pin,
                          generator=generator("cpu", "loader", self.seed, self.rank))

    def _step_items(self, epoch: int, steps: list[tuple[Tensor, Tensor | None]]) -> Iterator[list[tuple[int, int]]]:
        """Per step, the (dataset index, seed) items to decode: anchors, then partners, then the anchors
        again for a second view (decoded with their own seeds: independent augmentations). Lazy, so an
        epoch of ImageNet never holds more than the steps the DataLoader has prefetched."""
        for s, (idx, pidx) in enumerate(steps):
            order = idx.tolist()
            if pidx is not None:
                order += pidx.tolist()
            if self.needs.views == 2:
                order += idx.tolist()
            base = derive_seed("augment", self.seed, epoch, self.rank, s)
            yield [(i, (base + slot) % SEED_MOD) for slot, i in enumerate(order)]

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """This rank's batches for a 1-indexed epoch."""
        steps = list(self.sampler.epoch(epoch))  # index tensors only; the per-image items are made lazily
        parts = 1 + int(self.needs.pairs) + int(self.needs.views == 2)
        g_strong = generator(self.device, "augment", self.seed, epoch, self.rank) if self.needs.strong_view2 else None
        for (idx, pidx), blocks in zip(steps, self._loader(self.train_set, self._step_items(epoch, steps), parts)):
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

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's disjoint, contiguous share of the test set, centre-cropped and normalised."""
        n = len(self.test_y)
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        chunks = [list(range(s, min(s + batch_size, hi))) for s in range(lo, hi, batch_size)]
        for idx, (x,) in zip(chunks, self._loader(self.test_set, chunks, 1)):
            yield self.normalise(x), self.test_y[idx[0] : idx[-1] + 1].to(self.device, non_blocking=True)


def subset_files(data: FileDataset, per_class: int | None = None, classes: list[int] | None = None,
                 test_per_class: int | None = None) -> FileDataset:
    """:func:`ipsd.data.datasets.subset` for a FileDataset: the first ``per_class`` train (and
    ``test_per_class`` test) images of each class in list order; with ``classes``, only those, relabelled
    0..len-1 in the given order. Files keep their relative order."""
    tr, te, fields = subset_selection(data, per_class, classes, test_per_class)
    return replace(data, train_paths=[data.train_paths[i] for i in tr.tolist()],
                   test_paths=[data.test_paths[i] for i in te.tolist()], **fields)
