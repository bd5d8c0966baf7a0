"""inres-bench model zoo: residual, interpolated and plain networks, a registry, adapters."""

from . import zoo as _zoo  # noqa: F401  (registers the names)
from .base import CIFAR10_MEAN, CIFAR10_STD, InterpolatedNet, ModelInfo
from .errors import FieldError, UserError
from .preact_resnet import PreActResNet
from .registry import (
    GROUPS,
    ModelEntry,
    create_model,
    find_model,
    list_models,
    model_entries,
    model_entry,
    model_label,
    plain_counterpart,
    register_model,
    resolve_models,
)
from .resnext import ResNeXt
from .skip import RULES, SkipRule

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "GROUPS",
    "InterpolatedNet",
    "ModelEntry",
    "ModelInfo",
    "PreActResNet",
    "RULES",
    "ResNeXt",
    "SkipRule",
    "FieldError",
    "UserError",
    "create_model",
    "find_model",
    "plain_counterpart",
    "list_models",
    "model_entries",
    "model_entry",
    "model_label",
    "register_model",
    "resolve_models",
]
