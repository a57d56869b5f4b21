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

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..rng import derive_seed, generator
from .file_loader import FileLoader
from .folders import FileDataset, open_rgb

SEED_MOD = 2**63


def _transforms(image_size: int):
    from torchvision import transforms as T

    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.PILToTensor()])
    test = T.Compose([T.Resize(int(image_size * 256 / 224)), T.CenterCrop(image_size), T.PILToTensor()])
    return train, test


class _TrainImages(Dataset):
    """Items are ``(dataset index, seed)``: the image decoded and augmented with that seed, as uint8 (3, S, S)."""

    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, item: tuple[int, int]) -> Tensor:
        index, seed = item
        image = open_rgb(self.paths[index])
        with torch.random.fork_rng(devices=[]):  # only the CPU generator, restored afterwards
            torch.default_generator.manual_seed(seed)
            return self.transform(image)


class _TestImages(Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        return self.transform(open_rgb(self.paths[index]))


class _SplitCollate:
    """Stack a step's images and split them into ``parts`` equal blocks (anchors, partners, second views)."""

    def __init__(self, parts: int):
        self.parts = parts

    def __call__(self, images: list[Tensor]) -> tuple[Tensor, ...]:
        return torch.stack(images).chunk(self.parts)


class FolderLoader(FileLoader):
    def open(self, data: FileDataset) -> None:
        self.pin = self.device.type == "cuda"
        train_tf, test_tf = _transforms(self.size)
        self.train_set = _TrainImages(list(data.train_paths), train_tf)
        self.test_set = _TestImages(list(data.test_paths), test_tf)

    def _loader(self, dataset: Dataset, batch_sampler, parts: int) -> DataLoader:
        # Workers need no seeding of their own (each image has its own seed); the dedicated generator
        # only keeps the DataLoader from drawing its worker base seed from the global torch RNG.
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.workers,
                          collate_fn=_SplitCollate(parts), pin_memory=self.pin,
                          generator=generator("cpu", "loader", self.seed, self.rank))

    def _step_items(self, epoch: int, steps: list[tuple[Tensor, Tensor | None]]) -> Iterator[list[tuple[int, int]]]:
        """Per step, the (dataset index, seed) items to decode, in block order; each image slot has its own
        seed (so a second view is augmented independently of its anchor). Lazy, so an epoch of ImageNet
        never holds more than the steps the DataLoader has prefetched."""
        for s, (idx, pidx) in enumerate(steps):
            base = derive_seed("augment", self.seed, epoch, self.rank, s)
            yield [(i, (base + slot) % SEED_MOD) for slot, i in enumerate(self.step_order(idx, pidx).tolist())]

    def train_blocks(self, epoch: int, steps: list[tuple[Tensor, Tensor | None]]) -> Iterator[tuple[Tensor, ...]]:
        return iter(self._loader(self.train_set, self._step_items(epoch, steps), self.parts))

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's disjoint, contiguous share of the test set, centre-cropped and normalised."""
        lo, hi = self.test_range(len(self.test_y))
        chunks = [list(range(s, min(s + batch_size, hi))) for s in range(lo, hi, batch_size)]
        for idx, (x,) in zip(chunks, self._loader(self.test_set, chunks, 1)):
            yield self.normalise(x), self.test_y[idx[0] : idx[-1] + 1].to(self.device, non_blocking=True)
