"""inres-bench model zoo: residual, interpolated and plain networks, a registry, adapters."""

from . import zoo as _zoo  # noqa: F401  (registers the names)
from .base import (
    AUTHORS_CODE_STD,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    InterpolatedNet,
    ModelInfo,
)
from .errors import UserError
from .preact_resnet import PreActResNet
from .registry import GROUPS, create_model, list_models, model_entry, register_model, resolve_models
from .resnext import ResNeXt
from .skip import RULES, SkipRule

__all__ = [
    "AUTHORS_CODE_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "GROUPS",
    "InterpolatedNet",
    "ModelInfo",
    "PreActResNet",
    "RULES",
    "ResNeXt",
    "SkipRule",
    "UserError",
    "create_model",
    "list_models",
    "model_entry",
    "register_model",
    "resolve_models",
]
