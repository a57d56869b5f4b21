"""ImageNet-input (224x224) models: ResNet18/34/50/152, MobileNetV2 and MViTv2-T.

Each wraps the modules of a reference implementation (torchvision for the ResNets, timm built
with ``pretrained=False`` for the other two) in the ``Backbone`` interface, so every
distiller's taps (stem, stages, pre_pool, pooled) exist for them too. The wrapped modules are
the reference's own, so parameter counts, initialisation and ``parameters()`` order equal the
reference's (``tests/test_imagenet_models.py`` loads a reference state in that order and
compares outputs); the classifier is the reference's ``nn.Linear`` head sized for
``num_classes`` (same init as the reference), exposed as ``classifier``.
torchvision and timm are imported on a model's first build, not with this module (they
add seconds to start-up).

Taps (shapes at 224x224):

* ``imagenet_resnet*`` (torchvision layout: 7x7/2 conv + BN + ReLU + 3x3/2 max-pool, then
  ``layer1..4``; no zero-init of the last BN in each block, as torchvision's default):
  stem 64@56 (after the max-pool), stages 64/128/256/512@56/28/14/7 (x4 for the bottleneck
  nets), pre_pool = ``layer4``'s output. All taps are post-ReLU.
* ``mobilenetv2`` (timm ``mobilenetv2_100``): stem = ``conv_stem`` + ``bn1`` (BN + ReLU6)
  32@112; stages are timm's ``blocks`` grouped by its ``feature_info`` (each stage ends at a
  block group whose output is the last one at a reduction): ``blocks.0`` 16@112, ``blocks.1``
  24@56, ``blocks.2`` 32@28, ``blocks.3-4`` 96@14, ``blocks.5-6`` 320@7; pre_pool =
  ``conv_head`` + ``bn2`` (BN + ReLU6) 1280@7. Stage outputs are linear-bottleneck outputs
  (no activation after the projection), so unlike the CIFAR zoo they can be negative.
* ``mvitv2`` (timm ``mvitv2_tiny``, no class token, no absolute position embedding): stem =
  the patch-embedding convolution 96@56 (no norm or activation); stages = the four stage
  outputs, token sequences reshaped to maps 96/192/384/768@56/28/14/7 (the last before the
  final LayerNorm); pre_pool = the final LayerNorm'd tokens as a 768@7 map. timm's head is
  ``fc(mean over tokens)``, which is the global average of that map, so ``classifier(pooled)``
  gives timm's logits up to float summation order. The stage maps are strided views
  (channels-last memory), not copies. The model accepts any side divisible by 32 (the
  relative-position tables are sized for 224 and index fine at smaller sides).

Registry metadata: the ResNets are family ``imagenet_resnet`` (a family of their own, so
checks written for the CIFAR-input families, e.g. BYOT's list of ResNet families, have to opt
in to it explicitly), lr 0.1 (the standard ImageNet SGD recipe for batch 256). MobileNetV2 is
family ``mobilenet`` with lr 0.05: an assumption, as IPS does not state its MobileNetV2
ImageNet recipe. MViTv2-T is family ``mvit`` with lr 0.1 as a placeholder only: the original
MViTv2 recipe (facebookresearch/mvit ``configs/MVITv2_T.yaml``) trains with AdamW (base lr
2.5e-4, weight decay 0.05, gradient clipping at L2 norm 1.0, drop-path 0.1); runs set
``optimizer=adamw lr_schedule=cosine`` and their lr explicitly (``benchmarks/table2.yaml``);
gradient clipping is not available. The IPS paper's MViTv2 run uses batch 192 for 200 epochs.
Drop-path defaults to 0 here (timm's default, keeping train-mode forwards deterministic);
``build_mvitv2(num_classes, drop_path_rate=0.1)`` gives the original setting.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor, nn

from ipsd.models.base import Backbone, register_model, run_stages

if TYPE_CHECKING:
    import torchvision

__all__ = ["ImageNetResNet", "MViTv2", "MobileNetV2", "build_mvitv2", "mobilenetv2_stage_ends"]


class ImageNetResNet(Backbone):
    """torchvision ResNet trunk: ``stem`` = conv1/bn1/relu/maxpool, ``stages`` = layer1..4."""

    def __init__(self, net: torchvision.models.ResNet):
        super().__init__()
        self.stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        self.stages = nn.ModuleList([net.layer1, net.layer2, net.layer3, net.layer4])
        self.stage_channels = [_out_channels(s) for s in self.stages]
        self.num_features = net.fc.in_features
        self.classifier = net.fc

    def trunk(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        stem = self.stem(x)
        outs = run_stages(self.stages, stem)
        return stem, outs, outs[-1]


def _out_channels(stage: nn.Sequential) -> int:
    """Output width of a torchvision ResNet layer: that of its last block's final BN."""
    return [m for m in stage.modules() if isinstance(m, nn.BatchNorm2d)][-1].num_features


def _torchvision_resnet(arch: str, num_classes: int) -> ImageNetResNet:
    import torchvision.models  # imported on first build: it costs seconds at start-up

    return ImageNetResNet(getattr(torchvision.models, arch)(weights=None, num_classes=num_classes))


def _timm_model(arch: str, num_classes: int, **kwargs: object) -> nn.Module:
    """A randomly initialised timm model (never downloads); timm is imported on first build."""
    import timm

    return timm.create_model(arch, pretrained=False, num_classes=num_classes, **kwargs)


@register_model("imagenet_resnet18", "ResNet18", family="imagenet_resnet", lr=0.1)
def imagenet_resnet18(num_classes: int) -> ImageNetResNet:
    return _torchvision_resnet("resnet18", num_classes)


@register_model("imagenet_resnet34", "ResNet34", family="imagenet_resnet", lr=0.1)
def imagenet_resnet34(num_classes: int) -> ImageNetResNet:
    return _torchvision_resnet("resnet34", num_classes)


@register_model("imagenet_resnet50", "ResNet50", family="imagenet_resnet", lr=0.1)
def imagenet_resnet50(num_classes: int) -> ImageNetResNet:
    return _torchvision_resnet("resnet50", num_classes)


@register_model("imagenet_resnet152", "ResNet152", family="imagenet_resnet", lr=0.1)
def imagenet_resnet152(num_classes: int) -> ImageNetResNet:
    return _torchvision_resnet("resnet152", num_classes)


# ----------------------------------------------------------------------------- MobileNetV2


def mobilenetv2_stage_ends(feature_info: list[dict]) -> list[int]:
    """Index of the last ``blocks`` group of each stage, read from timm's ``feature_info``.

    timm lists, for each reduction, the last block group at it (``module='blocks.N'``), so the
    stages are ``blocks[prev_end + 1 : end + 1]``.
    """
    ends: list[int] = []
    for info in feature_info:
        prefix, _, idx = info["module"].partition(".")
        if prefix != "blocks" or not idx.isdigit():
            raise ValueError(f"unexpected feature_info module {info['module']!r}")
        ends.append(int(idx))
    if ends != sorted(set(ends)):
        raise ValueError(f"feature_info block indices are not increasing: {ends}")
    return ends


class MobileNetV2(Backbone):
    """timm EfficientNet-style MobileNetV2: stem conv+BN-ReLU6, inverted-residual stages, 1x1 head."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if not isinstance(net.classifier, nn.Linear):
            raise TypeError("build the timm model with num_classes > 0 so that its classifier is a Linear")
        self.stem = nn.Sequential(net.conv_stem, net.bn1)
        ends = mobilenetv2_stage_ends(net.feature_info)
        if ends[-1] != len(net.blocks) - 1:
            raise ValueError(f"feature_info stops at blocks.{ends[-1]} of {len(net.blocks)}")
        starts = [0] + [e + 1 for e in ends[:-1]]
        self.stages = nn.ModuleList(
            nn.Sequential(*[net.blocks[i] for i in range(a, b + 1)]) for a, b in zip(starts, ends, strict=True)
        )
        self.stage_channels = [info["num_chs"] for info in net.feature_info]
        self.head = nn.Sequential(net.conv_head, net.bn2)
        self.num_features = net.classifier.in_features
        self.classifier = net.classifier

    def trunk(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        stem = self.stem(x)
        outs = run_stages(self.stages, stem)
        return stem, outs, self.head(outs[-1])


@register_model("mobilenetv2", "MobileNetV2", family="mobilenet", lr=0.05)
def mobilenetv2(num_classes: int) -> MobileNetV2:
    return MobileNetV2(_timm_model("mobilenetv2_100", num_classes))


# ----------------------------------------------------------------------------- MViTv2


def _token_map(tokens: Tensor, size: list[int]) -> Tensor:
    """(B, H*W, C) tokens -> (B, C, H, W) view (channels-last strides, no copy)."""
    b, n, c = tokens.shape
    h, w = size
    if n != h * w:
        raise ValueError(f"{n} tokens do not form a {h}x{w} map")
    return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)


class MViTv2(Backbone):
    """timm MultiScaleVit without class token / absolute position embedding, as conv-style taps."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if net.cls_token is not None or net.pos_embed is not None or net.global_pool != "avg":
            raise ValueError("MViTv2 wrapper needs cls_token=None, pos_embed=None and average pooling")
        fc = net.head.fc
        if not isinstance(fc, nn.Linear):
            raise TypeError("build the timm model with num_classes > 0 so that its head is a Linear")
        self.stem = net.patch_embed.proj  # PatchEmbed = this conv, then flatten to tokens
        self.stages = nn.ModuleList(net.stages)
        self.stage_channels = [info["num_chs"] for info in net.feature_info]
        self.norm = net.norm
        self.num_features = fc.in_features
        self.classifier = fc

    def trunk(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        stem = self.stem(x)
        size = [stem.shape[-2], stem.shape[-1]]
        h = stem.flatten(2).transpose(1, 2)
        outs: list[Tensor] = []
        for stage in self.stages:
            h, size = stage(h, size)
            outs.append(_token_map(h, size))
        return stem, outs, _token_map(self.norm(h), size)


def build_mvitv2(num_classes: int, drop_path_rate: float = 0.0) -> MViTv2:
    """MViTv2-T; the original recipe uses ``drop_path_rate=0.1`` (the registry builds with 0)."""
    return MViTv2(_timm_model("mvitv2_tiny", num_classes, drop_path_rate=drop_path_rate))


@register_model("mvitv2", "MViTv2", family="mvit", lr=0.1)
def mvitv2(num_classes: int) -> MViTv2:
    return build_mvitv2(num_classes)
