"""The data layer: in-memory readers (CIFAR-10/100 pickles, the offline digits fallback), on-disk readers
(ImageNet, CUB-200, Stanford Dogs, class folders; FFCV ``.beton`` copies), the epoch sampler, the loaders, and
the batch contract in :mod:`ipsd.data.batch`. Importing the package registers the in-memory readers."""
from ipsd.data import cifar as _cifar  # noqa: F401  (registers cifar10, cifar100)
from ipsd.data import digits as _digits  # noqa: F401  (registers digits)
from ipsd.data.datasets import (
    DATASETS,
    DataError,
    ImageData,
    load_dataset,
    resolve_root,
    subset,
)

__all__ = ["DATASETS", "DataError", "ImageData", "load_dataset", "resolve_root", "subset"]
