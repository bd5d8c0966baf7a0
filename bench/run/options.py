"""What one benchmark run is asked to do: `run_bench.py` parses its arguments into
`RunOptions`; every value mistake is one error line when they are made."""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass

from bench.attacks.perturbations import DEFAULT_STEPS
from bench.core.environment import check_device_kind
from bench.core.numbers import SEED_LIMIT
from bench.eval.defenses import DefenseSpec
from bench.reports.leaderboard import check_metric
from models import UserError

STAGES = ("train", "eval", "check", "stability", "report", "figures")
DEFENSE_STAGES = ("eval", "check", "stability", "report")  # a defense's default: it is never trained here
EXECUTORS = ("local", "ray")
# Upper bounds of the counts, each with why: a value past one is a typo (2**70), and it
# would overflow SQLite's 64-bit integers or ask for memory no machine has, not run.
LIMITS: dict[str, tuple[int | float, str]] = {
    "n_train": (10**7, "no data set here has more images (CIFAR: 50,000); leave it out to train on all"),
    "n_stability": (10**7, "no data set here has more test images (CIFAR: 10,000)"),
    "batch_size": (2**16, "a larger batch of these models does not fit any GPU's memory"),
    "steps": (10**4, "500 times the protocol's 20 steps; PGD has long converged"),
    "workers": (1024, "more tasks at once than the paper suite has tasks"),
    "landscape_index": (10**7, "no test set here has more images"),
    "landscape_points": (501, "501 x 501 = 251,001 forward passes per model, finer than a figure shows"),
    "landscape_radius": (255, "255/255 spans the whole pixel range"),
    "assume_tflops": (10**6, "an exaFLOP/s: no device achieves it"),
}
LANDSCAPE = ("landscape_index", "landscape_points", "landscape_radius")  # RunOptions.landscape's parts
RAY_ADDRESS = re.compile(r"auto|(ray://)?(?P<host>[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})")


@dataclass(frozen=True)
class RunOptions:
    """What to run; None means "as the suite says"."""

    suite: str = "smoke"
    stages: tuple[str, ...] = STAGES[:5]  # the report draws the figures too
    models: str | None = None  # names, globs, groups
    datasets: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    preset: str = "paper"
    length: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    # AutoAttack's class-balanced subset; None: the suite's (never above n_test)
    n_autoattack: int | None = None
    # the stability stage's class-balanced subset; None: the suite's (never above n_test)
    n_stability: int | None = None
    lambda_init: tuple[float, float] | None = None  # replaces every study's initialisations
    radii_255: tuple[float, ...] | None = None  # replaces every study's radii (checked by EvalConfig)
    steps: int = DEFAULT_STEPS
    noise_source: str = "auto"
    batch_size: int | None = None
    device: str = "auto"  # auto: a GPU when there is one
    bf16: bool = False
    channels_last: bool = True
    compile: bool = False
    results_dir: str = "results"
    data_dir: str | None = None
    progress: bool = True
    dry_run: bool = False
    rehearse: bool = False  # the suite's whole plan on tiny data, tagged rehearsal (bench.run.rehearsal)
    rank_by: str = "pgd@2"  # the leaderboard's order
    # the report stage draws the figures (False: tables, REPORT.md and leaderboard alone)
    figures: bool = True
    # Fig. 2: clean test image (None: the paper's), grid points, radius in 1/255
    landscape: tuple[int | None, int, float] = (None, 21, 8.0)
    executor: str = "local"  # local: this machine's processes; ray: a Ray cluster (bench.run.executors)
    workers: int | None = None  # tasks at once; None: one per visible GPU, else 1 (local) or the cluster's
    ray_address: str | None = None  # join this Ray cluster; None: a Ray of this machine, on localhost only
    assume_tflops: float | None = None  # estimates from FLOPs at this achieved rate, instead of a probe
    # defenses to evaluate with the suite's protocol instead of the zoo (a built one from the Python API:
    # DefenseSpec.of); their data sets are their own
    defenses: tuple[DefenseSpec, ...] = ()

    def __post_init__(self) -> None:
        """Every value mistake is one error line here, before anything is loaded or run."""
        unknown = [s for s in self.stages if s not in STAGES]
        if not self.stages or unknown:
            raise UserError(
                f"unknown stage {(unknown or [''])[0]!r} in --stage; choose from {', '.join(STAGES)} "
                "(or summary, alone, on the command line)"
            )
        if self.seeds is not None:
            if not self.seeds or not all(isinstance(s, int) and 0 <= s < SEED_LIMIT for s in self.seeds):
                raise UserError(f"--seeds takes integers in [0, 2**32), got {list(self.seeds)}")
            twice = sorted({s for s in self.seeds if self.seeds.count(s) > 1})
            if twice:
                raise UserError(f"--seeds repeats {', '.join(map(str, twice))}: give each seed once")
        if self.lambda_init is not None:
            low, high = self.lambda_init
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise UserError(f"--lambda-init a,b needs finite numbers with a <= b, got {low:g},{high:g}")
        for name in ("n_train", "n_stability", "batch_size", "steps", "workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        counts = {**vars(self), **dict(zip(LANDSCAPE, self.landscape, strict=True))}
        for name, (limit, why) in LIMITS.items():
            if counts[name] is not None and counts[name] > limit:
                raise UserError(
                    f"--{name.replace('_', '-')} {counts[name]} is above its limit {limit:,}: {why}"
                )
        check_device_kind(self.device, auto=True)
        if self.executor not in EXECUTORS:
            raise UserError(f"unknown executor {self.executor!r}; choose one of {', '.join(EXECUTORS)}")
        if self.ray_address is not None and self.executor != "ray":
            raise UserError("--ray-address needs --executor ray")
        if self.ray_address is not None and not _ray_address(self.ray_address):
            raise UserError(
                f"--ray-address {self.ray_address!r} is not a Ray address: give auto, host:port or "
                "ray://host:port (port 1-65535), e.g. 10.0.0.1:6379"
            )
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise UserError("--executor ray needs Ray: pip install -e '.[cluster]'")
        if self.assume_tflops is not None and not (
            math.isfinite(self.assume_tflops) and self.assume_tflops > 0
        ):
            raise UserError(f"--assume-tflops must be a positive number, got {self.assume_tflops:g}")
        if self.rehearse and self.length is not None:
            raise UserError(
                f"--length {self.length} and --rehearse: a rehearsal trains for its own length (2 epochs of a "
                "few steps, tagged rehearsal); leave --length out, or run without --rehearse"
            )
        if self.defenses:
            self._check_defenses()
        # canonical (pgd@2.0: pgd@2) from here on
        object.__setattr__(self, "rank_by", check_metric(self.rank_by))
        index, points, radius = self.landscape
        if (index is not None and index < 0) or points < 2 or not (math.isfinite(radius) and radius > 0):
            raise UserError(
                f"the landscape needs --landscape-index >= 0, --landscape-points >= 2 and a positive finite "
                f"--landscape-radius, got {index}, {points}, {radius:g}"
            )

    def _check_defenses(self) -> None:
        """A defense run evaluates the defenses alone: the zoo's and training's options do not apply."""
        zoo = {
            "models": "--models",
            "datasets": "--datasets",
            "seeds": "--seeds",
            "lambda_init": "--lambda-init",
            "length": "--length",
            "n_train": "--n-train",
        }
        given = [flag for name, flag in zoo.items() if getattr(self, name) is not None]
        if given:
            raise UserError(
                f"{given[0]} selects zoo models, and this run evaluates defenses: leave it out (a defense's "
                "data set is its --dataset), or run the zoo without --defense"
            )
        if "train" in self.stages:
            raise UserError(
                "a defense is evaluated here, never trained: leave train out of --stage "
                "(e.g. --stage eval,check,stability,report)"
            )
        names = [(d.name, d.dataset) for d in self.defenses]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise UserError(
                f"defense {twice[0][0]!r} on {twice[0][1]} is named twice: give each defense its own name"
            )


def _ray_address(text: str) -> bool:
    match = RAY_ADDRESS.fullmatch(text)
    return match is not None and (text == "auto" or 1 <= int(match["port"]) <= 65535)
