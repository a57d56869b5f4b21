"""ShuffleNetV1 (g=3) and ShuffleNetV2 (1.0x) for CIFAR, as RepDistiller
``models/ShuffleNetv1.py`` ``ShuffleV1`` and ``models/ShuffleNetv2.py`` ``ShuffleV2``.

Both use a 1x1 stride-1 stem to 24 channels (no max-pool), three stages that each halve
the resolution (32 -> 16 -> 8 -> 4), global average pooling and a linear layer. Weights
keep PyTorch's default init, as in RepDistiller. Trained with lr 0.01.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ipsd.models.base import Backbone, register_model, run_stages


def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    """Interleave channels across ``groups`` so the next grouped conv mixes information."""
    if groups == 1:
        return x
    return x.unflatten(1, (groups, x.shape[1] // groups)).transpose(1, 2).flatten(1, 2)


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    """Bias-free conv + BN with "same" padding; ``groups=in_ch`` gives a depthwise conv."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class ShuffleNetBase(Backbone):
    """1x1 stem to 24 channels + ReLU, three stages, optional head conv, pool, linear."""

    stem: nn.Sequential
    stages: nn.ModuleList
    head: nn.Module  # applied to the last stage output to give ``pre_pool``

    def trunk(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        stem = self.stem(x)
        outs = run_stages(self.stages, stem)
        return stem, outs, self.head(outs[-1])

    def _init_stem(self) -> int:
        self.stem = nn.Sequential(conv_bn(3, 24, 1), nn.ReLU())
        return 24


# ----------------------------------------------------------------------------- V1


class ShuffleV1Unit(nn.Module):
    """Grouped 1x1 -> shuffle -> depthwise 3x3 -> grouped 1x1, plus a shortcut.

    Stride-2 units concatenate an avg-pooled copy of the input instead of adding it, so
    their branch produces ``out_ch - in_ch`` channels (the caller passes that width).
    The first 1x1 of the very first unit is ungrouped because 24 stem channels are few.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int):
        super().__init__()
        self.stride = stride
        mid = out_ch // 4
        self.first_groups = 1 if in_ch == 24 else groups
        self.reduce = conv_bn(in_ch, mid, 1, groups=self.first_groups)
        self.depthwise = conv_bn(mid, mid, 3, stride=stride, groups=mid)
        self.expand = conv_bn(mid, out_ch, 1, groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        out = channel_shuffle(F.relu(self.reduce(x)), self.first_groups)
        out = self.expand(F.relu(self.depthwise(out)))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(ShuffleNetBase):
    def __init__(self, widths: Sequence[int], depths: Sequence[int], groups: int, num_classes: int):
        super().__init__()
        in_ch = self._init_stem()
        stages = []
        for width, depth in zip(widths, depths, strict=True):
            units = [ShuffleV1Unit(in_ch, width - in_ch, stride=2, groups=groups)]
            units += [ShuffleV1Unit(width, width, stride=1, groups=groups) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*units))
            in_ch = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Identity()
        self.stage_channels = list(widths)
        self.num_features = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)


# ----------------------------------------------------------------------------- V2


class ShuffleV2Unit(nn.Module):
    """Channel split: half passes through, half goes 1x1 -> depthwise 3x3 -> 1x1; concat, shuffle."""

    def __init__(self, channels: int):
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            conv_bn(half, half, 1), nn.ReLU(), conv_bn(half, half, 3, groups=half), conv_bn(half, half, 1), nn.ReLU()
        )

    def forward(self, x: Tensor) -> Tensor:
        keep, work = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([keep, self.branch(work)], 1), 2)


class ShuffleV2Down(nn.Module):
    """Stride-2 unit: both halves see the whole input, each producing ``out_ch // 2`` channels."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        mid = out_ch // 2
        self.left = nn.Sequential(conv_bn(in_ch, in_ch, 3, stride=2, groups=in_ch), conv_bn(in_ch, mid, 1), nn.ReLU())
        self.right = nn.Sequential(
            conv_bn(in_ch, mid, 1),
            nn.ReLU(),
            conv_bn(mid, mid, 3, stride=2, groups=mid),
            conv_bn(mid, mid, 1),
            nn.ReLU(),
        )

    def forward(self, x: Tensor) -> Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1), 2)


class ShuffleNetV2(ShuffleNetBase):
    def __init__(self, widths: Sequence[int], depths: Sequence[int], head_width: int, num_classes: int):
        super().__init__()
        in_ch = self._init_stem()
        stages = []
        for width, depth in zip(widths, depths, strict=True):
            stages.append(nn.Sequential(ShuffleV2Down(in_ch, width), *[ShuffleV2Unit(width) for _ in range(depth)]))
            in_ch = width
        self.stages = nn.ModuleList(stages)
        self.head = nn.Sequential(conv_bn(in_ch, head_width, 1), nn.ReLU())
        self.stage_channels = list(widths)
        self.num_features = head_width
        self.classifier = nn.Linear(head_width, num_classes)


@register_model("shufflenetv1", "ShuffleNetV1", family="shufflenet", lr=0.01)
def shufflenetv1(num_classes: int) -> ShuffleNetV1:
    return ShuffleNetV1((240, 480, 960), (4, 8, 4), groups=3, num_classes=num_classes)


@register_model("shufflenetv2", "ShuffleNetV2", family="shufflenet", lr=0.01)
def shufflenetv2(num_classes: int) -> ShuffleNetV2:
    return ShuffleNetV2((116, 232, 464), (3, 7, 3), head_width=1024, num_classes=num_classes)
