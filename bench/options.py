"""What one benchmark run is asked to do: `run_bench.py` parses its arguments into
`RunOptions`; every value mistake is one error line when they are made."""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass

from models import UserError

from .cifar import data_root
from .leaderboard import check_metric
from .records import check_results_dir

STAGES = ("train", "eval", "check", "report", "figures")
EXECUTORS = ("local", "ray")
SEED_LIMIT = 2**32  # seeds are 32-bit: every generator and the records take them as they are


@dataclass(frozen=True)
class RunOptions:
    """What to run; None means "as the suite says"."""

    suite: str = "smoke"
    stages: tuple[str, ...] = STAGES[:4]  # the report draws the figures too
    models: str | None = None  # names, globs, groups
    datasets: tuple[str, ...] | None = None
    seeds: tuple[int, ...] | None = None
    preset: str = "paper"
    length: str | None = None
    n_train: int | None = None
    n_test: int | None = None
    lambda_init: tuple[float, float] | None = None  # replaces every study's initialisations
    radii: tuple[float, ...] | None = None  # in 1/255; replaces every study's radii
    steps: int = 20
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
    rank_by: str = "pgd@2"  # the leaderboard's order
    landscape: tuple[int | None, int, float] = (None, 21, 8.0)  # Fig. 2: clean test image (None: the paper's), grid points, radius in 1/255
    executor: str = "local"  # local: this machine's processes; ray: a Ray cluster (bench.executors)
    workers: int | None = None  # tasks at once; None: one per visible GPU, else 1 (local) or the cluster's
    ray_address: str | None = None  # join this Ray cluster; None: a Ray of this machine, on localhost only
    assume_tflops: float | None = None  # estimates from FLOPs at this achieved rate, instead of a probe

    def __post_init__(self):
        """Every value mistake is one error line here, before anything is loaded or run."""
        unknown = [s for s in self.stages if s not in STAGES]
        if not self.stages or unknown:
            raise UserError(f"unknown stage {(unknown or [''])[0]!r} in --stage; choose from {', '.join(STAGES)}")
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
        for name in ("n_train", "n_test", "batch_size", "steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise UserError(
                f"device {self.device!r} is not usable here (the benchmark runs on cpu, cuda, cuda:N or mps); "
                "use --device cpu"
            )
        if self.executor not in EXECUTORS:
            raise UserError(f"unknown executor {self.executor!r}; choose one of {', '.join(EXECUTORS)}")
        if self.workers is not None and self.workers < 1:
            raise UserError(f"--workers must be positive, got {self.workers}")
        if self.ray_address is not None and self.executor != "ray":
            raise UserError("--ray-address needs --executor ray")
        if self.executor == "ray" and importlib.util.find_spec("ray") is None:
            raise UserError("--executor ray needs Ray: pip install -e '.[cluster]'")
        if self.assume_tflops is not None and not (math.isfinite(self.assume_tflops) and self.assume_tflops > 0):
            raise UserError(f"--assume-tflops must be a positive number, got {self.assume_tflops:g}")
        check_results_dir(self.results_dir)
        data_root(self.data_dir)
        check_metric(self.rank_by)
        index, points, radius = self.landscape
        if (index is not None and index < 0) or points < 2 or not (math.isfinite(radius) and radius > 0):
            raise UserError(
                f"the landscape needs --landscape-index >= 0, --landscape-points >= 2 and a positive finite "
                f"--landscape-radius, got {index}, {points}, {radius:g}"
            )
