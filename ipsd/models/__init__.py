"""Model zoo: CIFAR (RepDistiller definitions) and ImageNet-input models; importing this package registers them."""
from ipsd.models import cifar_resnet, imagenet, resnet, shufflenet, vgg  # noqa: F401  (registration side effects)
from ipsd.models.base import (
    MODELS,
    Backbone,
    Features,
    ModelSpec,
    build_model,
    register_model,
)

__all__ = ["MODELS", "ModelSpec", "Features", "Backbone", "build_model", "register_model"]
