"""Dataset readers: CIFAR-10/100 (python-pickle layout) and the offline digits fallback."""
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
