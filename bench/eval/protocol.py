"""The protocol as data: `EvalConfig` (preset, radii in 1/255, steps, subsets, extras),
the cells it asks for, the subject they measure, and how cells group into units of work
(one pass over the data) and what those cost."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from bench.attacks.perturbations import (
    ATTACK,
    DEFAULT_STEPS,
    NOISE,
    PERTURBATIONS,
    AttackSetting,
    of_kind,
    perturbation,
)
from bench.core.environment import check_device_kind
from bench.core.numbers import SEED_LIMIT, radii_problem
from bench.core.presets import preset
from bench.data.noise import SEVERITIES
from bench.data.noise_files import NOISE_SOURCES
from bench.eval.adapters import Defense
from models import UserError

_NONE_MEANS = {"n_test": "the whole test set", "batch_size": "the device's default"}


@dataclass(frozen=True)
class EvalConfig:
    """How cells are computed. Radii and steps are in 1/255 of the pixel range."""

    preset: str = "paper"  # a protocol of bench.core.presets: "paper", "authors-code", "release-2020-06"
    eps_255: tuple[float, ...] = (1.0, 2.0, 4.0)  # FGSM radii
    iterative_eps_255: tuple[float, ...] | None = None  # IFGSM / PGD radii; None: eps_255
    steps: int = DEFAULT_STEPS  # IFGSM / PGD iterations
    alpha_255: float | None = None  # None: the preset's
    n_test: int | None = None  # class-balanced test subset; None: the whole test set
    noise_source: str = "auto"  # released, generated, or auto (released when present)
    batch_size: int | None = None  # None: 256 on a CPU, 512 on a GPU, halved on out-of-memory
    device: str = "cpu"
    seed: int = 0  # random starts and noise come from (seed, model seed, radius, batch)
    channels_last: bool = True  # faster convolutions on CPUs and GPUs alike
    # more registered attacks (bench.attacks.perturbations), each at its radii: (name, radii) pairs
    extra: tuple[tuple[str, tuple[float, ...]], ...] = ()
    # a smaller class-balanced subset for some perturbations (AutoAttack): (name, n) pairs
    subsets: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        """Every value checked as made, as the command line checks its options: one error
        line, never a silent coercion (1.5 steps) or a failure after cells were recorded."""
        for name in ("preset", "device", "noise_source"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"EvalConfig.{name} must be a string, got {getattr(self, name)!r}")
        preset(self.preset)  # one error line for an unknown name
        check_device_kind(self.device)  # whether this machine has one: checked where the work starts
        if self.noise_source not in NOISE_SOURCES:
            raise UserError(
                f"EvalConfig.noise_source must be one of {', '.join(NOISE_SOURCES)}, got {self.noise_source!r}"
            )
        _whole(self.steps, "EvalConfig.steps (the iterations of IFGSM and PGD)", 1)
        _whole(self.seed, "EvalConfig.seed (of the random starts and noise)", 0, SEED_LIMIT)
        for name in ("n_test", "batch_size"):
            value = getattr(self, name)
            if value is not None:
                _whole(value, f"EvalConfig.{name} (None: {_NONE_MEANS[name]})", 1)
        if not isinstance(self.channels_last, bool):
            raise UserError(f"EvalConfig.channels_last must be True or False, got {self.channels_last!r}")
        named = [
            ("eps_255", self.eps_255),
            ("iterative_eps_255", self.radii),
            *((f"extra {n}", r) for n, r in self.extra),
        ]
        for field_name, radii in named:
            if not isinstance(radii, tuple) or not all(_is_number(e) for e in radii):
                raise UserError(
                    f"EvalConfig.{field_name} must be a tuple of numbers (radii in 1/255), got {radii!r}"
                )
            problem = radii_problem(tuple(radii))
            if problem:
                raise UserError(
                    f"EvalConfig.{field_name} ({', '.join(f'{e:g}' for e in radii) or 'none'}): {problem}"
                )
        if self.alpha_255 is not None and not (
            _is_number(self.alpha_255) and math.isfinite(self.alpha_255) and self.alpha_255 > 0
        ):
            raise UserError(
                f"EvalConfig.alpha_255 (the step size) must be a positive number of 1/255, got {self.alpha_255!r}"
            )
        for name, _ in self.extra:
            if perturbation(name).kind != ATTACK:
                raise UserError(
                    f"{name!r} is not an attack to evaluate; attacks: {', '.join(attack_names())}"
                )
        for name, n in self.subsets:
            perturbation(name)
            _whole(n, f"EvalConfig.subsets: the test subset of {name}", 1)

    @property
    def attack_setting(self) -> AttackSetting:
        return AttackSetting(self.preset, self.steps, self.alpha_255)

    @property
    def pgd_ball(self) -> str:
        return self.attack_setting.pgd_ball

    @property
    def attack_units(self) -> str:
        return self.attack_setting.attack_units

    @property
    def alpha(self) -> float:
        return self.attack_setting.alpha

    @property
    def radii(self) -> tuple[float, ...]:
        return self.iterative_eps_255 if self.iterative_eps_255 is not None else self.eps_255

    def n_test_of(self, name: str) -> int | None:
        """The class-balanced subset size of a perturbation's cells (None: all images): a
        smaller subset of its own, never larger than the test subset."""
        own = dict(self.subsets).get(name)
        if own is None or self.n_test is None:
            return self.n_test if own is None else own
        return min(own, self.n_test)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _whole(value: object, what: str, low: int, limit: int | None = None) -> None:
    """One error line unless `value` is an integer (not a bool, not 1.5) in [low, limit)."""
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < low
        or (limit is not None and value >= limit)
    ):
        bound = f"in [{low}, {limit})" if limit is not None else f"at least {low}"
        raise UserError(f"{what} must be an integer {bound}, got {value!r}")


def attack_names() -> list[str]:
    return [p.name for p in of_kind(ATTACK)]


@dataclass(frozen=True)
class Cell:
    perturbation: str  # a registered perturbation's name (bench.attacks.perturbations)
    eps_255: float = 0.0
    severity: int = 0


@dataclass(frozen=True)
class Subject:
    """A defense and the facts records need about it."""

    defense: Defense
    model: str  # registered name, or the defense's own name
    run: str  # checkpoint tag: the model plus every option that changed its weights
    seed: int  # ENSEMBLE_SEED for an ensemble
    members: int = 1
    lambda_init: tuple[float, float] | None = None


def protocol_cells(config: EvalConfig) -> list[Cell]:
    cells = [Cell("clean")]
    cells += [Cell(group.name, 0.0, s) for group in of_kind(NOISE) for s in SEVERITIES]
    radii = {"eps_255": config.eps_255, "iterative": config.radii}
    cells += [
        Cell(p.name, e) for p in PERTURBATIONS.values() if p.protocol_radii for e in radii[p.protocol_radii]
    ]
    cells += [Cell(name, e) for name, radii in config.extra for e in radii]
    return list(dict.fromkeys(cells))


def units(cells: Sequence[Cell]) -> list[list[Cell]]:
    """Units of work, in protocol order: the cells of a perturbation that shares one pass
    over the data between its radii (FGSM's gradient) together, every other cell alone."""
    work: list[list[Cell]] = []
    shared: dict[str, list[Cell]] = {}
    for cell in cells:
        if not perturbation(cell.perturbation).shares_radii:
            work.append([cell])
        elif cell.perturbation in shared:
            shared[cell.perturbation].append(cell)
        else:
            shared[cell.perturbation] = [cell]
            work.append(shared[cell.perturbation])
    return work


def unit_passes(unit: Sequence[Cell], n: int, config: EvalConfig) -> tuple[float, float]:
    """(forward, forward+backward) image passes of a unit of `n` images."""
    return perturbation(unit[0].perturbation).passes(n, len(unit), config)


def units_cost(unit: Sequence[Cell], n: int, config: EvalConfig) -> float:
    forward, gradient = unit_passes(unit, n, config)
    return forward * FORWARD + gradient * FORWARD_BACKWARD


def unit_name(unit: list[Cell]) -> str:
    cell = unit[0]
    if perturbation(cell.perturbation).kind == ATTACK:
        return f"{cell.perturbation}@{'/'.join(f'{c.eps_255:g}' for c in unit)}"
    return f"{cell.perturbation}#{cell.severity}" if cell.severity else cell.perturbation


FORWARD, FORWARD_BACKWARD = 1.0, 3.0  # progress-bar cost of one image pass (an attack step ~ 3 forwards)
