#!/usr/bin/env python
"""What the stability stage costs, against one PGD-20 cell on the same images.

For each model (freshly initialised, eval mode: the cost does not depend on the weights
but for the Lanczos iterations, which stop early when the estimates settle), on the same
class-balanced synthetic images: one PGD-20 cell as the engine runs it (20 steps at
2/255, then the classifying pass), then every unit of the stage with its default settings
(bench.eval.stability.StabilityConfig), timed in one run. Prints seconds per image, the
stage's cost in PGD-20 cells on the same images, and what that means for a suite: the
stage on its `n_stability` images against one PGD-20 cell on its test set.

    python benchmarks/bench_stability.py                            # resnet110, in-resnet110, 20 images
    python benchmarks/bench_stability.py --models resnet14 --n 20 --device cuda
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.attacks.gradient import run_seeded  # noqa: E402
from bench.attacks.perturbations import perturbation  # noqa: E402
from bench.eval.engine import prepared
from bench.eval.protocol import EvalConfig
from bench.eval.stability import StabilityConfig, measure, stage_units  # noqa: E402
from bench.run.suites import SUITES  # noqa: E402
from models import create_model  # noqa: E402


def pgd_cell(model, x, y, setting: EvalConfig) -> float:
    """Seconds of one PGD-20 cell at 2/255 on (x, y): the attack and the classifying pass."""
    began = time.perf_counter()
    for start in range(0, len(x), 256):
        xb, yb = x[start : start + 256], y[start : start + 256]
        adversarial = run_seeded(
            lambda a, b: perturbation("pgd").perturb(model, a, b, [2 / 255], setting), xb, yb, 0
        )
        with torch.no_grad():
            model(adversarial[0]).argmax(1)
    return time.perf_counter() - began


def costs(name: str, n: int, device: str = "cpu") -> tuple[float, dict[str, float]]:
    """Seconds of one PGD-20 cell and of each stage unit, on the same n images, for the
    freshly initialised `name` on `device` (also the GPU check's stability section)."""
    torch.manual_seed(0)
    x = torch.rand(n, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.arange(n, device=device) % 10
    setting, config = EvalConfig(device=device), StabilityConfig(n=n)
    model = prepared(create_model(name), setting)
    pgd_cell(model, x[:2], y[:2], setting)  # warm-up: the first pass of a model allocates
    pgd = _timed(lambda: pgd_cell(model, x, y, setting), device)
    units = {
        unit.name: _timed(lambda u=unit: measure(model, u, x, y, config, setting, 0), device)
        for unit in stage_units(1)
    }
    return pgd, units


def _timed(work, device: str) -> float:
    began = time.perf_counter()
    work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet110,in-resnet110")
    parser.add_argument("--n", type=int, default=20, help="images (default 20)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.n} images, {args.device}, "
        f"defaults {StabilityConfig()}"
    )
    for name in args.models.split(","):
        pgd, units = costs(name, args.n, args.device)
        stage = sum(units.values())
        print(
            f"\n{name}: PGD-20 cell {pgd / args.n * 1000:.1f} ms/image; stage {stage / args.n * 1000:.1f} ms/image "
            f"= {stage / pgd:.2f} PGD-20 cells on the same images"
        )
        for unit, seconds in units.items():
            print(f"  {unit:22s} {seconds / args.n * 1000:8.1f} ms/image  ({seconds / pgd:.2f} of the cell)")
        for suite in SUITES.values():
            n_test = suite.n_test or 10_000
            n = min(suite.n_stability, n_test)
            ratio = (stage / args.n * n) / (pgd / args.n * n_test)
            print(f"  suite {suite.name}: stage on {n} images / PGD-20 cell on {n_test} = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
