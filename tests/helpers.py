"""Small synthetic data shared by unit tests (real-data tests use the `cifar10_root` fixture)."""
from __future__ import annotations

import torch

from ipsd.data import ImageData


def toy_data(n_per_class: int = 10, classes: int = 4, size: int = 32, seed: int = 0) -> ImageData:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randint(0, 256, (len(y), 3, size, size), generator=g, dtype=torch.uint8)
    return ImageData(name="toy", train_x=x, train_y=y, test_x=x[:8].clone(), test_y=y[:8].clone(),
                     classes=[str(c) for c in range(classes)], mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
