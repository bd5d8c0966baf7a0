#!/usr/bin/env python
"""How good is `--dry-run`'s estimate? For each scenario: a fresh results dir, the dry
run's estimate (probed throughput, as a new user gets it), then the run itself (stages
train and eval: what the estimate covers), timed; prints estimate / actual. Also the
estimates of three models of the same size, which should agree within 20%.

Scenarios (CPU):
- smoke: the smoke suite as `python run_bench.py` runs it;
- small: ResNet-110, In-ResNet-110 and λ-In-ResNet-110 (the quick suite's main models)
  with the smoke protocol on a 4,660-image CIFAR-10-format folder: 1 seed, 2 epochs on
  its first 2,048 images (the smoke suite's), 50 test images, radius 2/255.

    python benchmarks/bench_estimate.py                 # both scenarios (minutes on a CPU)
    python benchmarks/bench_estimate.py --scenarios smoke
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.data.synthetic import make_synthetic  # noqa: E402
from bench.records.store import RecordStore  # noqa: E402
from bench.run.estimate import estimate  # noqa: E402
from bench.run.options import RunOptions  # noqa: E402
from bench.run.pipeline import run
from bench.run.plan import plan_jobs, plan_tasks  # noqa: E402
from bench.run.suites import find_suite  # noqa: E402
from bench.run.todo import ToDo  # noqa: E402

SAME_SIZE = "resnet110,in-resnet110,lambda-in-resnet110"


def small_cifar(root: Path, n_train: int = 4660, n_test: int = 500) -> None:
    """A CIFAR-10-format folder of learnable images (the synthetic set's generator; files
    that are not the release, as a user's subset would be)."""
    make_synthetic(root / "cifar-10-batches-py", n_train=n_train, n_test=n_test)


def scenario(name: str, root: Path) -> RunOptions:
    common = {
        "results_dir": str(root / "results"),
        "data_dir": str(root / "data"),
        "progress": False,
        "stages": ("train", "eval"),
    }
    if name == "smoke":
        return RunOptions(**common)
    small_cifar(root / "data")
    return RunOptions(
        models=SAME_SIZE, datasets=("cifar10",), seeds=(0,), n_test=50, radii_255=(2.0,), **common
    )


def estimated(options: RunOptions):
    spec = find_suite(options.suite)
    tasks = plan_tasks(plan_jobs(spec, options), spec, options, "cpu")
    todo = ToDo(options, spec, "cpu", RecordStore(options.results_dir, readonly=True), dry=True)
    return estimate(todo, tasks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="smoke,small")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    lines = ["| scenario | estimated | actual | estimate / actual |", "|---|---|---|---|"]
    for name in args.scenarios.split(","):
        with tempfile.TemporaryDirectory() as folder:
            options = scenario(name, Path(folder))
            if name == "small":  # the data dir exists before the estimate, as for a user
                frame = estimated(options)
                per_model = frame.groupby("model", sort=False)["seconds"].sum()
                spread = per_model.max() / per_model.min()
                print(
                    f"same-size models, estimated seconds: {per_model.round(1).to_dict()} (max/min {spread:.2f})"
                )
            else:
                frame = estimated(options)
            guess = frame["seconds"].sum()
            began = time.perf_counter()
            assert run(replace(options)) == 0
            actual = time.perf_counter() - began
        lines.append(f"| {name} | {guess:.0f} s | {actual:.0f} s | {guess / actual:.2f} |")
        print(lines[-1], flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
