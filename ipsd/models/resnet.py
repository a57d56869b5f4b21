"""ResNet18/34/50/101 for 32x32 inputs, as RepDistiller ``models/resnetv2.py``.

This is the ImageNet block layout with a 3x3 stride-1 stem and no max-pool (inferred to be the
zoo behind IPS's Hard-Label ResNet18 = 77.9 %; IPS's code is not public). The blocks and the generic ``ResNet`` here
are shared with the small 3-stage CIFAR ResNets in ``cifar_resnet.py``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from ipsd.models.base import Backbone, he_init, register_model, run_stages


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Bias-free convolution + BN ("same" padding), the unit all residual branches are built from."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    )


class ResidualBlock(nn.Module):
    """Post-activation residual block: ``relu(branch(x) + shortcut(x))``.

    The shortcut is the identity, or a 1x1 conv + BN projection when stride or width changes.
    """

    expansion: int = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1):
        super().__init__()
        out_ch = planes * self.expansion
        self.branch = self.make_branch(in_ch, planes, stride)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = conv_bn(in_ch, out_ch, 1, stride)

    def make_branch(self, in_ch: int, planes: int, stride: int) -> nn.Sequential:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


class BasicBlock(ResidualBlock):
    """Two 3x3 convolutions; the stride sits on the first."""

    expansion = 1

    def make_branch(self, in_ch: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(conv_bn(in_ch, planes, 3, stride), nn.ReLU(), conv_bn(planes, planes, 3))


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand by 4."""

    expansion = 4

    def make_branch(self, in_ch: int, planes: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            conv_bn(in_ch, planes, 1),
            nn.ReLU(),
            conv_bn(planes, planes, 3, stride),
            nn.ReLU(),
            conv_bn(planes, planes * self.expansion, 1),
        )


class ResNet(Backbone):
    """3x3 conv stem + BN + ReLU, then residual stages, global average pool, linear.

    Used both for the 4-stage ImageNet-layout nets (stem 64, widths 64/128/256/512) and for
    the 3-stage CIFAR nets (stem 16 or 32, widths 16/32/64 or 64/128/256).
    """

    def __init__(
        self,
        block: type[ResidualBlock],
        depths: Sequence[int],
        widths: Sequence[int],
        strides: Sequence[int],
        stem_width: int,
        num_classes: int,
    ):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, stem_width, 3), nn.ReLU())
        stages: list[nn.Sequential] = []
        in_ch = stem_width
        for depth, planes, stride in zip(depths, widths, strides, strict=True):
            blocks = []
            for i in range(depth):
                blocks.append(block(in_ch, planes, stride if i == 0 else 1))
                in_ch = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.stage_channels = [w * block.expansion for w in widths]
        self.num_features = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)

        he_init(self)  # RepDistiller's, with zero_init_residual=False

    def trunk(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        stem = self.stem(x)
        outs = run_stages(self.stages, stem)
        return stem, outs, outs[-1]


def _imagenet_layout(block: type[ResidualBlock], depths: Sequence[int], num_classes: int) -> ResNet:
    return ResNet(block, depths, (64, 128, 256, 512), (1, 2, 2, 2), stem_width=64, num_classes=num_classes)


@register_model("resnet18", "ResNet18", family="resnet")
def resnet18(num_classes: int) -> ResNet:
    return _imagenet_layout(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model("resnet34", "ResNet34", family="resnet")
def resnet34(num_classes: int) -> ResNet:
    return _imagenet_layout(BasicBlock, (3, 4, 6, 3), num_classes)


@register_model("resnet50", "ResNet50", family="resnet")
def resnet50(num_classes: int) -> ResNet:
    return _imagenet_layout(Bottleneck, (3, 4, 6, 3), num_classes)


@register_model("resnet101", "ResNet101", family="resnet")
def resnet101(num_classes: int) -> ResNet:
    return _imagenet_layout(Bottleneck, (3, 4, 23, 3), num_classes)
