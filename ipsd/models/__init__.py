"""CIFAR model zoo (RepDistiller definitions); importing this package registers every model."""
from ipsd.models import cifar_resnet, resnet, shufflenet, vgg  # noqa: F401  (registration side effects)
from ipsd.models.base import (
    MODELS,
    Backbone,
    Features,
    ModelSpec,
    build_model,
    register_model,
)

__all__ = ["MODELS", "ModelSpec", "Features", "Backbone", "build_model", "register_model"]
