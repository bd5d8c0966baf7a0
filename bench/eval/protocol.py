"""The protocol as data: `EvalConfig` (preset, radii in 1/255, steps, subsets, extras),
the cells it asks for, the subject they measure, and how cells form groups (those computed
in one pass over the data) and what those cost."""

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
    Perturbation,
    of_kind,
    perturbation,
)
from bench.core.environment import check_device_kind
from bench.core.numbers import SEED_LIMIT
from bench.core.presets import preset
from bench.data.noise import NOISE_GROUPS, SEVERITIES
from bench.data.noise_files import NOISE_SOURCES
from bench.data.splits import BALANCED, FIRST, SUBSET_RULES
from bench.eval.adapters import Defense
from models import FieldError, UserError

_NONE_MEANS = {"n_test": "the whole test set", "batch_size": "the device's default"}
# An upper bound of a test subset, with why: a value past it is a typo (2**70) that would
# overflow SQLite's 64-bit integers, not a run.
TEST_IMAGES_LIMIT = (10**7, "no data set here has more test images (CIFAR: 10,000)")


@dataclass(frozen=True)
class EvalConfig:
    """How cells are computed. Radii and steps are in 1/255 of the pixel range."""

    preset: str = "paper"  # a protocol of bench.core.presets: "paper", "authors-code", "release-2020-06"
    radii_255: tuple[float, ...] = (1.0, 2.0, 4.0)  # the attacks' radii (FGSM, IFGSM, PGD)
    # IFGSM / PGD's instead (an ensemble's); None: radii_255
    iterative_radii_255: tuple[float, ...] | None = None
    steps: int = DEFAULT_STEPS  # IFGSM / PGD iterations
    alpha_255: float | None = None  # None: the preset's
    n_test: int | None = None  # test subset (drawn by `subset_rule`); None: the whole test set
    # how every subset is drawn: BALANCED (ours), or FIRST (RobustBench's first n), recorded
    # in each cell's params: the two never pool
    subset_rule: str = BALANCED
    noise_source: str = "auto"  # released, generated, or auto (released when present)
    # the CIFAR-C files measured at every severity: the paper's noise groups, or RobustBench's
    # 15 corruptions (released files only: bench.data.noise_files)
    noise_groups: tuple[str, ...] = NOISE_GROUPS
    batch_size: int | None = None  # None: 256 on a CPU, 512 on a GPU, halved on out-of-memory
    device: str = "cpu"
    seed: int = 0  # random starts and noise come from (seed, model seed, radius, batch)
    channels_last: bool = True  # faster convolutions on CPUs and GPUs alike
    # more registered attacks (bench.attacks.perturbations), each at its radii: (name, radii) pairs
    extra: tuple[tuple[str, tuple[float, ...]], ...] = ()
    # ... and those measured only on a defense found randomized (AutoAttack's rand version)
    randomized_extra: tuple[tuple[str, tuple[float, ...]], ...] = ()
    # a smaller class-balanced subset for some perturbations (AutoAttack): (name, n) pairs
    subsets: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        """Every value checked as made, as the command line checks its options: one error
        line, never a silent coercion (1.5 steps) or a failure after cells were recorded."""
        for name in ("preset", "device", "noise_source", "subset_rule"):
            if not isinstance(getattr(self, name), str):
                raise UserError(f"EvalConfig.{name} must be a string, got {getattr(self, name)!r}")
        preset(self.preset)  # one error line for an unknown name
        check_device_kind(self.device)  # whether this machine has one: checked where the work starts
        if self.noise_source not in NOISE_SOURCES:
            raise UserError(
                f"EvalConfig.noise_source must be one of {', '.join(NOISE_SOURCES)}, got {self.noise_source!r}"
            )
        if self.subset_rule not in SUBSET_RULES:
            raise UserError(
                f"EvalConfig.subset_rule must be one of {', '.join(SUBSET_RULES)}, got {self.subset_rule!r}"
            )
        _check_groups(self.noise_groups, self.noise_source)
        _whole(self.steps, "EvalConfig.steps (the iterations of IFGSM and PGD)", 1)
        _whole(self.seed, "EvalConfig.seed (of the random starts and noise)", 0, SEED_LIMIT)
        if self.batch_size is not None:
            _whole(self.batch_size, f"EvalConfig.batch_size (None: {_NONE_MEANS['batch_size']})", 1)
        if self.n_test is not None:
            _count("n_test", self.n_test)
        if not isinstance(self.channels_last, bool):
            raise UserError(f"EvalConfig.channels_last must be True or False, got {self.channels_last!r}")
        named = [  # (field, radii, the largest radius its attacks take)
            ("radii_255", self.radii_255, 255.0),
            *(
                [("iterative_radii_255", self.iterative_radii_255, 255.0)]
                if self.iterative_radii_255 is not None
                else []
            ),
            *(
                (f"extra {n}", r, PERTURBATIONS[n].largest_radius_255 if n in PERTURBATIONS else 255.0)
                for n, r in (*self.extra, *self.randomized_extra)
            ),
        ]
        for field_name, radii, limit_255 in named:
            _check_radii(field_name, radii, limit_255)
        if self.alpha_255 is not None and not (
            _is_number(self.alpha_255) and math.isfinite(self.alpha_255) and self.alpha_255 > 0
        ):
            raise UserError(
                f"EvalConfig.alpha_255 (the step size) must be a positive number of 1/255, got {self.alpha_255!r}"
            )
        for name, _ in (*self.extra, *self.randomized_extra):
            if perturbation(name).kind != ATTACK:
                raise UserError(
                    f"{name!r} is not an attack to evaluate; attacks: {', '.join(attack_names())}"
                )
        for name, n in self.subsets:
            perturbation(name)
            _count(f"subsets {name}", n)
            if self.n_test is not None and n > self.n_test:
                raise FieldError(
                    "EvalConfig",
                    f"subsets {name}",
                    f"{n}",
                    f"more than the {self.n_test} test images it is drawn from: give at most "
                    f"{self.n_test}, or test on more images",
                )

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

    def radii_255_of(self, p: Perturbation) -> tuple[float, ...]:
        """The radii a protocol attack is measured at (bench.attacks.perturbations' `iterative`)."""
        return (
            self.iterative_radii_255
            if p.iterative and self.iterative_radii_255 is not None
            else self.radii_255
        )

    def n_test_of(self, name: str) -> int | None:
        """The subset size of a perturbation's cells (None: all images)."""
        return dict(self.subsets).get(name, self.n_test)

    @property
    def subset_params(self) -> dict:
        """What every cell records of the subset rule: nothing for ours (the records before
        the rule existed keep their keys), `{"subset": "first"}` for RobustBench's."""
        return {"subset": FIRST} if self.subset_rule == FIRST else {}


def _check_groups(groups: object, source: str) -> None:
    """One error line unless `groups` are registered CIFAR-C files, each once, that
    `source` can give (only the paper's noise groups can be generated)."""
    known = [p.name for p in of_kind(NOISE)]
    if not isinstance(groups, tuple) or not all(isinstance(g, str) for g in groups):
        raise UserError(f"EvalConfig.noise_groups must be a tuple of names, got {groups!r}")
    unknown = [g for g in groups if g not in known]
    twice = sorted({g for g in groups if groups.count(g) > 1})
    if unknown or twice:
        problem = f"unknown: {', '.join(unknown)}" if unknown else f"given twice: {', '.join(twice)}"
        raise FieldError(
            "EvalConfig", "noise_groups", ",".join(groups), f"{problem}; known: {', '.join(known)}"
        )
    made = [g for g in groups if g not in NOISE_GROUPS]
    if source == "generated" and made:
        raise FieldError(
            "EvalConfig",
            "noise_source",
            source,
            f"{', '.join(made)} cannot be generated, only read from the released files: give released",
        )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_radii(field: str, radii: object, limit_255: float = 255.0) -> None:
    """One error line unless `radii` are radii an attack can take: a tuple of at least one
    number of 1/255, each finite in [0, limit_255] (the attack's largest_radius_255), none a
    negative zero (-0 would be recorded as a cell of its own at radius 0), none twice."""
    if not isinstance(radii, tuple) or not all(_is_number(e) for e in radii):
        raise UserError(f"EvalConfig.{field} must be a tuple of numbers (radii in 1/255), got {radii!r}")
    shown = ",".join(f"{e:g}" for e in radii)
    bad = [f"{e:g}" for e in radii if not (math.isfinite(e) and 0 <= e <= limit_255)]
    twice = sorted({e for e in radii if radii.count(e) > 1})
    if not radii:
        problem = "no radius given"
    elif bad:
        problem = (
            f"must be finite numbers of 1/255 in [0, {limit_255:g}], got {', '.join(dict.fromkeys(bad))}"
        )
    elif any(e == 0 and math.copysign(1.0, e) < 0 for e in radii):
        problem = "-0 is not a radius: give 0"
    elif twice:
        problem = f"{', '.join(f'{e:g}' for e in twice)} given twice: give each radius once"
    else:
        return
    raise FieldError("EvalConfig", field, shown, problem)


def _count(field: str, value: object) -> None:
    """One error line unless `value` is a count of test images: an integer (not a bool,
    not 1.5) from 1 up to TEST_IMAGES_LIMIT."""
    limit, why = TEST_IMAGES_LIMIT
    if not isinstance(value, int) or isinstance(value, bool):
        problem = "must be a whole number of test images (None: the whole test set)"
    elif value < 1:
        problem = "must be positive"
    elif value > limit:
        problem = f"is above its limit {limit:,}: {why}"
    else:
        return
    raise FieldError("EvalConfig", field, f"{value!r}", problem)


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


def protocol_cells(config: EvalConfig, randomized: bool = False) -> list[Cell]:
    """The cells `config` asks for; with `randomized` (a defense whose forward passes
    differ), its `randomized_extra` too."""
    cells = [Cell("clean")]
    cells += [Cell(group, 0.0, s) for group in config.noise_groups for s in SEVERITIES]
    cells += [
        Cell(p.name, e) for p in PERTURBATIONS.values() if p.in_protocol for e in config.radii_255_of(p)
    ]
    cells += [Cell(name, e) for name, radii in config.extra for e in radii]
    cells += [Cell(name, e) for name, radii in config.randomized_extra if randomized for e in radii]
    return list(dict.fromkeys(cells))


def cell_groups(cells: Sequence[Cell]) -> list[list[Cell]]:
    """Groups of cells, in protocol order: the cells of a perturbation that shares one pass
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


def group_passes(group: Sequence[Cell], n: int, config: EvalConfig) -> tuple[float, float]:
    """(forward, forward+backward) image passes of a group of `n` images."""
    return perturbation(group[0].perturbation).passes(n, len(group), config)


def group_cost(group: Sequence[Cell], n: int, config: EvalConfig) -> float:
    forward, gradient = group_passes(group, n, config)
    return forward * FORWARD + gradient * FORWARD_BACKWARD


def group_name(group: list[Cell]) -> str:
    cell, p = group[0], perturbation(group[0].perturbation)
    if p.kind == ATTACK:  # its radii as its metric names write them
        return f"{cell.perturbation}@{'/'.join(f'{p.shown_radius(c.eps_255):g}' for c in group)}"
    return f"{cell.perturbation}#{cell.severity}" if cell.severity else cell.perturbation


FORWARD, FORWARD_BACKWARD = 1.0, 3.0  # progress-bar cost of one image pass (an attack step ~ 3 forwards)
