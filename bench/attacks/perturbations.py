"""The registry of perturbations: every kind of cell the harness can measure, in one place.

A `Perturbation` says what it is called, what kind it is (clean, noise, attack), which
parameters identify a measurement (recorded as canonical JSON, part of the cell key), how
it perturbs a batch, what that costs and how to order or describe its parameter sets.
Evaluation, records, aggregation, tables, the leaderboard and `--rank-by` ask the
registry; adding an attack is one class and one `register` call (see `bench/attacks/autoattack.py`).

Units: `x` float32 N x 3 x H x W in [0, 1], `y` int64 N, radii `eps` in pixel units
(2/255 = 0.0078) when passed to `perturb`, in 1/255 everywhere else (`eps_255`), in the
perturbation's norm: L-infinity, or L2 (the L2 norm of x_adv - x over all C x H x W values).
Metric names and labels write an L2 radius in pixel units, as RobustBench does
(`pgd-l2@0.5`: eps_255 127.5); an L-infinity one in 1/255 (`pgd@2`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from bench.attacks.gradient import L2, LINF, PIXELS, Space, fgsm, normalised_space, signed_steps
from bench.core.presets import NORMALISED, PIXEL, PRESETS, START, preset
from bench.data.noise import CORRUPTIONS, NOISE_GROUPS
from models import UserError

if TYPE_CHECKING:
    import torchattacks

CLEAN, NOISE, ATTACK, DERIVED = "clean", "noise", "attack", "derived"
PRESET_ALPHA_255 = {name: p.alpha_255 for name, p in PRESETS.items()}  # IFGSM / PGD step size, in 1/255
DEFAULT_STEPS = 20  # the paper's IFGSM / PGD iterations: every default step count reads this one
RADIUS_LIMIT_255 = 64 * 255.0  # the largest radius of any perturbation (L2: 64 pixel units), in 1/255


class Setting(Protocol):
    """What a perturbation reads of a protocol: an AttackSetting, or an EvalConfig (bench.eval.protocol)."""

    @property
    def preset(self) -> str: ...
    @property
    def steps(self) -> int: ...
    @property
    def pgd_ball(self) -> str: ...
    @property
    def attack_units(self) -> str: ...
    @property
    def alpha(self) -> float: ...


@dataclass(frozen=True)
class AttackSetting:
    """What an attack's recorded parameters depend on besides its radius: the protocol
    preset, the step count and the step size (1/255; None: the preset's)."""

    preset: str = "paper"
    steps: int = DEFAULT_STEPS
    alpha_255: float | None = None

    @property
    def pgd_ball(self) -> str:
        """Where PGD's projection ball is centred: on the image (the paper's text), or on
        the random start (the release's test_pgd.py)."""
        return preset(self.preset).pgd_ball

    @property
    def attack_units(self) -> str:
        """Units of the preset's FGSM / IFGSM / PGD: pixels, or the model's normalised input."""
        return preset(self.preset).attack_units

    @property
    def alpha(self) -> float:
        return (self.alpha_255 if self.alpha_255 is not None else preset(self.preset).alpha_255) / 255


@dataclass(frozen=True)
class Perturbation:
    """One kind of cell. Subclasses override what differs; the defaults are a clean pass."""

    name: str  # in the records and metric names (`pgd@2`)
    label: str  # in tables and the leaderboard
    kind: str = ATTACK  # CLEAN, NOISE, ATTACK, or DERIVED (computed from other cells' bits)
    shares_radii: bool = False  # all radii in one pass over the data (FGSM's one gradient)
    leaderboard: bool = False  # a column of the leaderboard at 2/255
    randomized: bool = False  # draws random numbers: seeded per batch by the engine
    # The protocol's facts about it, read by the engine, the gates, tables and figures:
    in_protocol: bool = False  # measured by every run, at EvalConfig's radii (bench.eval.protocol)
    iterative: bool = False  # in the protocol at EvalConfig.iterative_radii_255, which an ensemble narrows
    pools: bool = False  # averaged with the others that pool into the "noise" metric (Table 1's Avg.)
    # an attack whose accuracy must not rise with the radius (gate eps-monotone)
    falls_with_radius: bool = True
    not_weaker_than: str | None = None  # may not leave more accuracy than this one (gate iterative-vs-fgsm)
    noise_check_of: str | None = None  # random noise the named attack must beat (gate noise-vs-pgd)
    # a stronger attack the named one must come close to (gate reference-gap)
    reference_for: str | None = None
    chance_from_255: float | None = None  # at radii from this on, any model is at chance (gate large-eps)
    curve: bool = False  # a panel of the robustness figure
    units: str | None = PIXEL  # the units of its radii: PIXEL, or None: the preset's (FGSM, IFGSM, PGD)
    norm: str = LINF  # the norm its radii are measured in: LINF or L2

    @property
    def shown_per_255(self) -> float:
        """How many 1/255 one unit of its written radii is: 1 (L-infinity radii written in
        1/255), 255 (L2 radii written in pixel units, as RobustBench's 0.5)."""
        return 255.0 if self.norm == L2 else 1.0

    @property
    def largest_radius_255(self) -> float:
        """The largest radius that means something, in 1/255: the whole pixel range in
        L-infinity; in L2, 64 pixel units, past the L2 diameter of a 32x32 RGB image in
        [0, 1] (sqrt(3072) = 55.4)."""
        return RADIUS_LIMIT_255 if self.norm == L2 else 255.0

    def shown_radius(self, eps_255: float) -> float:
        """A radius in the unit its metric names write it (`shown_per_255`)."""
        return eps_255 / self.shown_per_255

    def radius_text(self, eps_255: float) -> str:
        """A radius as tables and lines write it: `2/255`, or `0.5` (L2, pixel units)."""
        return f"{self.shown_radius(eps_255):g}" + ("" if self.norm == L2 else "/255")

    def params(self, setting: Setting, eps_255: float) -> dict:
        """The parameters that identify a measurement besides the radius (recorded)."""
        return {}

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], setting: Setting
    ) -> list[Tensor]:
        """The perturbed batch for each radius in `eps` (pixel units)."""
        return [x for _ in eps]

    def passes(self, n: int, n_radii: int, setting: Setting) -> tuple[float, float]:
        """(forward, forward+backward) image passes for `n` images at `n_radii` radii, the
        final classifying forward included: for progress bars and estimates."""
        return n * n_radii, 0.0

    def reach(self, setting: Setting, eps: float) -> float:
        """How far (in its norm, pixel units) a perturbed image may lie from x: what the
        audit allows. The radius, unless the perturbation's ball is centred elsewhere; any
        distance in normalised units, whose clip to the normalised [0, 1] moves a pixel
        outside [mean, mean + std] by as much as its distance to that box."""
        return 1.0 if self._units(setting) == NORMALISED else eps

    def _units(self, setting: Setting) -> str:
        return self.units if self.units is not None else setting.attack_units

    def _space(self, model: nn.Module, setting: Setting) -> Space:
        return normalised_space(model) if self._units(setting) == NORMALISED else PIXELS

    def _units_params(self, setting: Setting) -> dict:
        """Recorded: a measurement in normalised units never pools with a pixel one."""
        return {"units": NORMALISED} if self._units(setting) == NORMALISED else {}

    def strength(self, params: dict) -> tuple:
        """Orders parameter sets of one radius: the largest is the strongest attack."""
        return ()

    def describe(self, params: dict) -> str:
        """A measurement's parameters in words, for the lines naming what was left out."""
        return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in params.items())


@dataclass(frozen=True)
class Clean(Perturbation):
    kind: str = CLEAN


@dataclass(frozen=True)
class NoiseGroup(Perturbation):
    """A CIFAR-C noise group at one severity: the images come from its file (the engine
    reads them); nothing is done to them here."""

    kind: str = NOISE
    pools: bool = True


@dataclass(frozen=True)
class FGSM(Perturbation):
    """Paper Eq. 19 at every radius from one input gradient."""

    shares_radii: bool = True
    leaderboard: bool = True
    in_protocol: bool = True
    curve: bool = True

    def params(self, setting: Setting, eps_255: float) -> dict:
        return self._units_params(setting)

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], setting: Setting
    ) -> list[Tensor]:
        return fgsm(model, x, y, eps, self._space(model, setting))

    def passes(self, n: int, n_radii: int, setting: Setting) -> tuple[float, float]:
        return n * n_radii, n


@dataclass(frozen=True)
class Iterative(Perturbation):
    """`steps` signed-gradient steps of size alpha, projected onto the eps-ball and [0, 1]
    (subclasses: which torchattacks attack takes them). Alpha and steps come from the
    setting (the preset's alpha, --steps) unless `steps` / `alpha_per_eps` fix them here.

    The ball is centred on x ("image", the paper's text) or, for PGD under a setting whose
    `pgd_ball` is "start" (the release's presets), on the unclipped random start, as the
    release (`ball` None: the setting's); radii and steps are in pixel units or, under the
    release-2020-06 preset, in the model's normalised units (`units` None: the setting's).
    A start-centred or normalised measurement records `"ball": "start"` / `"units":
    "normalised"` in its params, so it never pools with the paper's PGD."""

    leaderboard: bool = True
    steps: int | None = None  # None: the setting's
    alpha_per_eps: float | None = None  # alpha = this x eps (None: the setting's alpha)
    ball: str | None = "image"  # "image", "start", or None: the setting's pgd_ball

    def attack(self, model: nn.Module, eps: float, alpha: float, steps: int) -> torchattacks.Attack:
        """The torchattacks attack, every argument given (its defaults are not the paper's)."""
        if steps < 1:  # BIM picks its own step count for steps=0: never let that happen silently
            raise ValueError(f"{self.name} needs at least one step, got {steps}")
        import torchattacks  # here, not at the top: it loads scipy, which a run that attacks nothing skips

        return self._torchattack(torchattacks, model, eps, alpha, steps)

    def _torchattack(self, torchattacks: Any, model: nn.Module, eps: float, alpha: float, steps: int) -> Any:
        raise NotImplementedError

    def params(self, setting: Setting, eps_255: float) -> dict:
        steps = self.steps if self.steps is not None else setting.steps
        alpha = self.alpha_per_eps * eps_255 if self.alpha_per_eps is not None else setting.alpha * 255
        params = {"alpha_255": round(alpha, 6), "steps": int(steps), **self._units_params(setting)}
        return {**params, "ball": START} if self._ball(setting) == START else params

    def _ball(self, setting: Setting) -> str:
        return self.ball if self.ball is not None else setting.pgd_ball

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], setting: Setting
    ) -> list[Tensor]:
        steps = self.steps if self.steps is not None else setting.steps
        alpha = self.alpha_per_eps * eps[0] if self.alpha_per_eps is not None else setting.alpha
        if self._ball(setting) == START or self._units(setting) == NORMALISED:  # the release's loop, ours
            return [
                signed_steps(
                    model,
                    x,
                    y,
                    eps[0],
                    alpha,
                    steps,
                    random_start=self.randomized,
                    ball=self._ball(setting),
                    space=self._space(model, setting),
                )
            ]
        return [self.attack(model, eps[0], alpha, steps)(x, y)]

    def reach(self, setting: Setting, eps: float) -> float:
        if self._units(setting) == NORMALISED:
            return super().reach(setting, eps)
        return 2 * eps if self._ball(setting) == START else eps

    def passes(self, n: int, n_radii: int, setting: Setting) -> tuple[float, float]:
        steps = self.steps if self.steps is not None else setting.steps
        return n * n_radii, n * n_radii * steps

    def strength(self, params: dict) -> tuple:
        return (params.get("steps", 0), params.get("alpha_255", 0.0))

    def describe(self, params: dict) -> str:
        steps = params["steps"]
        return f"{steps} step{'' if steps == 1 else 's'} at α {self.radius_text(params['alpha_255'])}"


@dataclass(frozen=True)
class IFGSM(Iterative):
    """Paper Eq. 20: torchattacks.BIM, which starts at x."""

    def _torchattack(self, torchattacks: Any, model: nn.Module, eps: float, alpha: float, steps: int) -> Any:
        return torchattacks.BIM(model, eps=eps, alpha=alpha, steps=steps)


@dataclass(frozen=True)
class PGD(Iterative):
    """torchattacks.PGD: starts at x + U[-eps, eps] clipped to [0, 1]."""

    randomized: bool = True

    def _torchattack(self, torchattacks: Any, model: nn.Module, eps: float, alpha: float, steps: int) -> Any:
        return torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=True)


@dataclass(frozen=True)
class PGDL2(Iterative):
    """torchattacks.PGDL2: starts at a random point of the L2 ball (radius eps, pixel
    units, over all C x H x W values), steps of L2 length alpha along the normalised
    gradient, projected onto the ball and [0, 1]. Pixel units only (no release preset has it)."""

    randomized: bool = True
    norm: str = L2

    def _torchattack(self, torchattacks: Any, model: nn.Module, eps: float, alpha: float, steps: int) -> Any:
        return torchattacks.PGDL2(model, eps=eps, alpha=alpha, steps=steps, random_start=True)

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], setting: Setting
    ) -> list[Tensor]:
        # torchattacks views each input gradient as (N, -1), which a channels-last network's
        # is not: the same network, its input gradients handed back in the default layout
        return super().perturb(_NCHWGradients(model).eval(), x.contiguous(), y, eps, setting)


class _DefaultLayout(torch.autograd.Function):
    """The identity, whose gradient is made contiguous in the default (NCHW) layout."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad.contiguous()


class _NCHWGradients(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(_DefaultLayout.apply(x))


@dataclass(frozen=True)
class UniformNoise(Perturbation):
    """x + U[-eps, eps] per value, clipped to [0, 1]: random noise in the eps-ball. A sanity
    check: if it hurts more than PGD at the same radius, PGD's gradients are broken."""

    randomized: bool = True
    falls_with_radius: bool = False  # random noise: no gradient, no monotone accuracy to ask for
    noise_check_of: str | None = "pgd"
    curve: bool = True

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], setting: Setting
    ) -> list[Tensor]:
        return [torch.clamp(x + e * (2 * torch.rand_like(x) - 1), 0, 1) for e in eps]


@dataclass(frozen=True)
class SphereNoise(UniformNoise):
    """x + eps u, u a uniformly random direction (a Gaussian draw over all C x H x W values,
    normalised), clipped to [0, 1]: random noise at L2 distance eps (at most, after the
    clip). The L2 ball's sanity check against PGD-L2."""

    norm: str = L2
    noise_check_of: str | None = "pgd-l2"
    curve: bool = False  # the robustness figure's panels are L-infinity radii

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], setting: Setting
    ) -> list[Tensor]:
        direction = torch.randn_like(x)
        direction /= direction.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1)))
        return [torch.clamp(x + e * direction, 0, 1) for e in eps]


@dataclass(frozen=True)
class Worst(Perturbation):
    """Per example, correct only if it survives every attack measured at that radius on the
    same images: computed from the stored bits, never evaluated."""

    kind: str = DERIVED
    leaderboard: bool = True

    def perturb(
        self, model: nn.Module, x: Tensor, y: Tensor, eps: Sequence[float], setting: Setting
    ) -> list[Tensor]:
        raise UserError("the worst case is computed from recorded cells, not evaluated")

    def describe(self, params: dict) -> str:
        return "over " + ", ".join(params.get("of", []))


PERTURBATIONS: dict[str, Perturbation] = {}


def register(perturbation: Perturbation) -> Perturbation:
    if perturbation.name in PERTURBATIONS:
        raise ValueError(f"perturbation {perturbation.name!r} is registered twice")
    if "@" in perturbation.name or not perturbation.name:
        raise ValueError(f"perturbation names are non-empty and have no '@': {perturbation.name!r}")
    PERTURBATIONS[perturbation.name] = perturbation
    return perturbation


def perturbation(name: str) -> Perturbation:
    if name not in PERTURBATIONS:
        raise UserError(f"unknown perturbation {name!r}; registered: {', '.join(PERTURBATIONS)}")
    return PERTURBATIONS[name]


def of_kind(*kinds: str) -> list[Perturbation]:
    return [p for p in PERTURBATIONS.values() if p.kind in kinds]


def pooled_noise() -> list[str]:
    """The perturbations averaged into the "noise" metric, in registration order."""
    return [p.name for p in PERTURBATIONS.values() if p.pools]


def file_groups() -> list[str]:
    """The perturbations read from a CIFAR-C file (noise groups and corruptions), each one
    metric over its five severities, in registration order."""
    return [p.name for p in of_kind(NOISE)]


def curves() -> list[str]:
    """The panels of the robustness figure, in registration order."""
    return [p.name for p in PERTURBATIONS.values() if p.curve]


def params_text(params: dict) -> str:
    """The canonical JSON of a parameter set: the records' `params` column."""
    return json.dumps(params, sort_keys=True, separators=(",", ":"))


def metric_name(perturbation_name: str, eps_255: float) -> str:
    """`clean`, a noise group's name, or `<attack>@<radius>` with the radius as the attack
    writes it: `pgd@2` (1/255), `pgd-l2@0.5` (L2, pixel units)."""
    known = PERTURBATIONS.get(perturbation_name)
    if known is not None and known.kind in (CLEAN, NOISE):
        return perturbation_name
    return f"{perturbation_name}@{known.shown_radius(eps_255) if known else eps_255:g}"


def metric_radius(name: str) -> tuple[str, float]:
    """(perturbation, eps_255) of an attack's metric name (`pgd@2` -> ("pgd", 2.0)): the one
    reader of the radius a metric name holds, the inverse of `metric_name`."""
    attack, at, eps = name.partition("@")
    if not at:
        raise ValueError(f"metric {name!r} names no radius")
    known = PERTURBATIONS.get(attack)
    return attack, float(eps) * (known.shown_per_255 if known else 1.0)


def parse_metric(name: str) -> str | None:
    """The canonical form of a metric name (`pgd@2.0` -> `pgd@2`), or None when no
    registered perturbation has it."""
    if name in ("noise", *(p.name for p in of_kind(CLEAN, NOISE))):
        return name
    try:
        attack, value = metric_radius(name)
    except ValueError:
        return None
    if attack not in PERTURBATIONS or PERTURBATIONS[attack].kind not in (ATTACK, DERIVED):
        return None
    return metric_name(attack, value) if math.isfinite(value) and value >= 0 else None


register(Clean("clean", "Acc."))
for _group in NOISE_GROUPS:
    register(NoiseGroup(_group, _group.split("_")[0].capitalize()))
# RobustBench's other corruptions: released files only, never part of the "noise" metric
for _group in CORRUPTIONS:
    if _group not in NOISE_GROUPS:
        register(NoiseGroup(_group, _group.replace("_", " ").capitalize(), pools=False))
register(FGSM("fgsm", "FGSM", units=None))
register(
    IFGSM("ifgsm", "IFGSM", units=None, in_protocol=True, iterative=True, not_weaker_than="fgsm", curve=True)
)
register(
    PGD(
        "pgd",
        "PGD",
        ball=None,
        units=None,
        in_protocol=True,
        iterative=True,
        not_weaker_than="fgsm",
        curve=True,
    )
)
register(UniformNoise("uniform", "Uniform noise"))
register(SphereNoise("uniform-l2", "Random direction L2"))
# Sanity check: PGD with 50 steps of 2.5 eps / 50 at a large radius must bring any
# undefended model to chance (Madry et al.'s step rule).
register(PGD("pgd50", "PGD-50", leaderboard=False, steps=50, alpha_per_eps=2.5 / 50, chance_from_255=16.0))
register(Worst("worst", "Worst case"))
# L2 (RobustBench's second threat model): radii in pixel units; not in the paper's protocol.
# 20 steps (the paper's count, fixed: no preset has an L2 step) of Madry et al.'s 2.5 eps / 20.
register(
    PGDL2(
        "pgd-l2",
        "PGD-L2",
        leaderboard=False,
        units=PIXEL,
        alpha_per_eps=2.5 / DEFAULT_STEPS,
        steps=DEFAULT_STEPS,
    )
)
# The large-radius gate in L2: PGD-L2 with 50 steps of 2.5 eps / 50 from 8 pixel units on (the
# L-infinity 64/255 ball reaches 13.9) must bring any model to chance.
register(
    PGDL2(
        "pgd50-l2",
        "PGD-50 L2",
        leaderboard=False,
        units=PIXEL,
        steps=50,
        alpha_per_eps=2.5 / 50,
        chance_from_255=8.0 * 255,
    )
)
