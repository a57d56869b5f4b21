"""The small 3-stage CIFAR ResNets of the KD literature, as RepDistiller ``models/resnet.py``.

``resnet{d}``: stem 16, stages 16/32/64 with (d-2)/6 BasicBlocks each (d = 6n+2).
``resnet{d}x4``: the same with a 32-wide stem and stages 64/128/256 (the common
resnet32x4 -> resnet8x4 teacher/student pair). Blocks are shared with ``resnet.py``; the
final 8x8 map is globally average-pooled (RepDistiller's fixed ``AvgPool2d(8)`` at 32x32).
"""
from __future__ import annotations

from ipsd.models.base import register_model
from ipsd.models.resnet import BasicBlock, ResNet

_NARROW = (16, (16, 32, 64))  # (stem width, stage widths)
_WIDE = (32, (64, 128, 256))


def cifar_resnet(depth: int, wide: bool, num_classes: int) -> ResNet:
    """Build a 6n+2-layer 3-stage CIFAR ResNet."""
    if (depth - 2) % 6:
        raise ValueError(f"depth must be 6n+2 for BasicBlock CIFAR ResNets, got {depth}")
    n = (depth - 2) // 6
    stem_width, widths = _WIDE if wide else _NARROW
    return ResNet(BasicBlock, (n, n, n), widths, (1, 2, 2), stem_width=stem_width, num_classes=num_classes)


def _register(depth: int, wide: bool) -> None:
    name = f"resnet{depth}x4" if wide else f"resnet{depth}"

    def build(num_classes: int) -> ResNet:
        return cifar_resnet(depth, wide, num_classes)

    build.__name__ = name
    register_model(name, name, family="cifar_resnet")(build)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(_depth, wide=False)
for _depth in (8, 32):
    _register(_depth, wide=True)
