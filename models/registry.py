"""Model registry in the style of timm: `@register_model(name)` + `create_model(name, **kw)`.

Names, globs (`in-resnet*`) and groups (`all`, `main`, `variants`, `small`) resolve through
`resolve_models`; an unknown name is a `UserError` that lists the closest names.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .base import InterpolatedNet
from .errors import UserError
from .skip import DEFAULT_LAMBDA_INIT, init_for_coefficients, uses_lambda


@dataclass(frozen=True)
class ModelEntry:
    """A registered name and what is known of it without building the network (timm's
    model config): tables, claims, figures and recipes read these facts, never the name."""

    name: str
    factory: Callable[..., InterpolatedNet]
    groups: tuple[str, ...]
    description: str
    arch: str = ""  # the architecture the skip rule is applied to, e.g. preact-resnet110-basic
    family: str = ""  # picks the training recipe: preact-resnet or resnext
    rule: str = ""  # key of models.skip.RULES
    depth: int = 0  # layers
    lambda_init: tuple[float, float] = DEFAULT_LAMBDA_INIT  # λ_n ~ U[a, b] by default
    label: str = ""  # how tables and figures name it, e.g. "λ-In-ResNet-110"
    tables: tuple[int, ...] = ()  # the paper's tables with a row for it
    networks: tuple[str, ...] = ("paper",)  # models.base.NETWORKS it can be built as
    refused: str = ""  # why the benchmark's plan refuses to train it ('' when it trains)

    @property
    def damped_lambda_init(self) -> tuple[float, float] | None:
        """The default λ initialisation, or None where the rule has no λ (residual, plain)."""
        return self.lambda_init if uses_lambda(self.rule) else None

    def init_for(self, coefficients: tuple[float, float]) -> tuple[float, float]:
        """The λ (or gate bias) interval that starts this model's coefficients in U[a, b]."""
        return init_for_coefficients(self.rule, coefficients)


_MODELS: dict[str, ModelEntry] = {}
GROUPS = {
    "main": "the paper's nine models (Tables 1-3, 6)",
    "variants": "the In-ResNet-110 variants of Table 4",
    "all": "every model of the paper: main + variants",
    "small": "shallow versions of each rule for quick runs and tests",
}


def register_model(
    name: str, *, groups: Iterable[str] = (), description: str = "", **facts: Any
) -> Callable[[Callable[..., InterpolatedNet]], Callable[..., InterpolatedNet]]:
    """Decorator: register `factory(**kwargs) -> InterpolatedNet` under `name`, with the
    facts of `ModelEntry` (arch, family, rule, depth, lambda_init, label, tables, networks, refused) that
    can be read without building it."""

    def add(factory: Callable[..., InterpolatedNet]) -> Callable[..., InterpolatedNet]:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        unknown = set(groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown groups {sorted(unknown)} for {name!r}")
        _MODELS[name] = ModelEntry(
            name, factory, tuple(groups), description or factory.__doc__ or "", **{"label": name, **facts}
        )
        return factory

    return add


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a glob, in natural order (resnet8 before resnet20)."""
    return sorted((n for n in _MODELS if fnmatch.fnmatchcase(n, pattern)), key=_natural)


def _natural(name: str) -> list:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def model_entry(name: str) -> ModelEntry:
    if name not in _MODELS:
        raise UserError(_unknown(name))
    return _MODELS[name]


def model_entries() -> list[ModelEntry]:
    """Every registered model, in registration order (the paper's table order)."""
    return list(_MODELS.values())


def find_model(arch: str, rule: str) -> ModelEntry | None:
    """The registered model applying `rule` to `arch`, if there is one."""
    return next((e for e in _MODELS.values() if (e.arch, e.rule) == (arch, rule)), None)


def plain_counterpart(model: str) -> str | None:
    """The registered ResNet (residual rule) of the same architecture as `model`, or None
    (for a ResNet itself, an unregistered model, or one without a ResNet)."""
    if model not in _MODELS:
        return None
    entry = _MODELS[model]
    if entry.rule in ("", "residual"):
        return None
    plain = find_model(entry.arch, "residual")
    return None if plain is None else plain.name


def model_label(name: str) -> str:
    """How reports name a model: its registered label, else the name (other defenses)."""
    return _MODELS[name].label if name in _MODELS else name


def resolve_models(wanted: str | Iterable[str]) -> list[str]:
    """Expand comma-separated names, globs and group names into registered names, in
    order of first appearance without repeats. Raises UserError for a part matching nothing."""
    parts = wanted.split(",") if isinstance(wanted, str) else list(wanted)
    names: list[str] = []
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if part in GROUPS:
            found = [n for n, e in _MODELS.items() if part in e.groups]
        elif any(ch in part for ch in "*?["):
            found = list_models(part)
        else:
            found = [part] if part in _MODELS else []
        if not found:
            raise UserError(_unknown(part))
        names += [n for n in found if n not in names]
    if not names:
        raise UserError("no model named: pass --models with names, globs or a group (e.g. all)")
    return names


def create_model(name: str, **kwargs: Any) -> InterpolatedNet:
    """Build a registered model; kwargs override the factory's defaults (num_classes, mean,
    std, lambda_init, damp_scope, network, ...). The result takes [0, 1] inputs and carries `.info`."""
    factory = model_entry(name).factory
    accepted = inspect.signature(factory).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise UserError(
                f"model {name!r} has no option {', '.join(unknown)}; it takes: {', '.join(accepted)}"
            )
    try:
        model = factory(**kwargs)
    except ValueError as err:
        raise UserError(f"model {name!r}: {err}") from None
    return model.named(name)


def _unknown(name: str) -> str:
    close = difflib.get_close_matches(name, list(_MODELS) + list(GROUPS), n=5, cutoff=0.6)
    hint = f"closest: {', '.join(close)}" if close else f"groups: {', '.join(GROUPS)}"
    return f"unknown model {name!r}; {hint} (list them all with: python run_bench.py --list-models)"
