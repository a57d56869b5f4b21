"""Common interface of every zoo model, and the model registry.

Distillers need the same handful of taps from every architecture (stem, per-stage maps,
the map that is pooled, the pooled vector), so each model only describes how to compute
``stem -> stages -> pre_pool`` and this base class does the pooling and classification.
Because ``forward`` runs the identical code path whether or not features are requested,
the logits are bit-identical either way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar, overload

import torch.nn.functional as F
from torch import Tensor, nn

from ipsd.registry import Registry


@dataclass
class Features:
    """Intermediate activations that feature-based distillers tap (all post-activation)."""

    stem: Tensor  # output of the stem (first block for VGG)
    stages: list[Tensor]  # output of each stage, shallow -> deep
    pre_pool: Tensor  # (B, D, h, w) map that gets global-average-pooled
    pooled: Tensor  # (B, D) classifier input


class Backbone(nn.Module):
    """Base class of every zoo model: subclasses implement ``trunk`` and set the attributes."""

    num_features: int  # D of ``pooled``
    stage_channels: list[int]  # channels of each ``stages`` entry
    classifier: nn.Linear  # final layer; distillers (e.g. shared heads) look it up by name

    def trunk(self, x: Tensor) -> tuple[Tensor, list[Tensor], Tensor]:
        """Return ``(stem, stages, pre_pool)`` for an input batch."""
        raise NotImplementedError

    @overload
    def forward(self, x: Tensor) -> Tensor: ...

    @overload
    def forward(self, x: Tensor, features: bool) -> Tensor | tuple[Tensor, Features]: ...

    def forward(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, Features]:
        """Logits, or ``(logits, Features)`` when ``features`` is true."""
        stem, stages, pre_pool = self.trunk(x)
        pooled = F.adaptive_avg_pool2d(pre_pool, 1).flatten(1)
        logits = self.classifier(pooled)
        if features:
            return logits, Features(stem=stem, stages=stages, pre_pool=pre_pool, pooled=pooled)
        return logits


def run_stages(stages: Iterable[nn.Module], h: Tensor) -> list[Tensor]:
    """Apply ``stages`` in order to ``h``, keeping every stage's output (the ``Features.stages`` taps)."""
    outs = []
    for stage in stages:
        h = stage(h)
        outs.append(h)
    return outs


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture: how to build it and its RepDistiller-recipe learning rate."""

    name: str  # registry key, e.g. "resnet18"
    display: str  # name used in the paper's tables, e.g. "ResNet18"
    build: Callable[[int], Backbone]  # num_classes -> freshly initialised model
    lr: float  # initial learning rate (0.05; 0.01 for ShuffleNets, 0.1 for the ImageNet ResNets and MViTv2)
    family: str  # "resnet", "cifar_resnet", "vgg", "shufflenet", "imagenet_resnet", "mobilenet", "mvit"


MODELS: Registry[ModelSpec] = Registry[ModelSpec]("model")

BuilderT = TypeVar("BuilderT", bound=Callable[[int], Backbone])


def register_model(name: str, display: str, family: str, lr: float = 0.05) -> Callable[[BuilderT], BuilderT]:
    """Decorator registering a builder ``fn(num_classes) -> Backbone`` under ``name``."""

    def add(builder: BuilderT) -> BuilderT:
        MODELS.register(name)(ModelSpec(name=name, display=display, build=builder, lr=lr, family=family))
        return builder

    return add


def build_model(name: str, num_classes: int) -> Backbone:
    """Instantiate a registered model; unknown names raise ``KeyError`` naming close matches."""
    return MODELS.get(name).build(num_classes)


def he_init(module: nn.Module) -> None:
    """RepDistiller's initialisation of its ResNets: He-normal (fan_out) convs, unit-weight zero-bias
    BatchNorm; linear layers keep PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
