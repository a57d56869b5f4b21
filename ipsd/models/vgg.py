"""VGG13/VGG16 with BN for CIFAR, as RepDistiller ``models/vgg.py`` ("FC layers are removed").

Five blocks of 3x3 conv (with bias) + BN + ReLU. Max-pool follows blocks 0-2; block 3 is
followed by a max-pool only for 64x64 inputs, so at 32x32 blocks 3 and 4 both run at 4x4.
Then global average pooling and a single ``Linear(512, C)`` (no 4096-wide MLP).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ipsd.models.base import Backbone, register_model

# Output channels of each conv, per block (torchvision's configurations "B" and "D").
CFG_B: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512))
CFG_D: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def _block(in_ch: int, widths: Sequence[int]) -> nn.Sequential:
    """Conv+BN+ReLU per width, except that the block's last ReLU is left to ``trunk``.

    Leaving it out keeps the block's output pre-activation, as in RepDistiller, so a
    distiller could tap it there.
    """
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        in_ch = w
    return nn.Sequential(*layers[:-1])


class VGG(Backbone):
    """VGG-BN with five blocks and one linear classifier."""

    def __init__(self, cfg: Sequence[Sequence[int]], num_classes: int):
        super().__init__()
        blocks, in_ch = [], 3
        for widths in cfg:
            blocks.append(_block(in_ch, widths))
            in_ch = widths[-1]
        self.blocks = nn.ModuleList(blocks)
        self.stage_channels = [widths[-1] for widths in cfg[1:]]
        self.num_features = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)

        # RepDistiller init: conv N(0, sqrt(2 / (k*k*C_out))), zero bias; unit BN; linear N(0, 0.01).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def trunk(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        pool_after_block3 = x.shape[-2] == 64
        stem = F.relu(self.blocks[0](x))
        h = stem
        stages: list[Tensor] = []
        for i, block in enumerate(self.blocks[1:], start=1):
            if i <= 3 or pool_after_block3:  # pool the previous block's output
                h = F.max_pool2d(h, 2)
            h = F.relu(block(h))
            stages.append(h)
        return stem, stages, h


@register_model("vgg13", "VGG13", family="vgg")
def vgg13(num_classes: int) -> VGG:
    return VGG(CFG_B, num_classes)


@register_model("vgg16", "VGG16", family="vgg")
def vgg16(num_classes: int) -> VGG:
    return VGG(CFG_D, num_classes)
