"""Evaluation throughput: each perturbation through the harness, against hand-written loops.

Ratios measured in one run, rounds alternating, best of each:
- PGD-20 through the harness (`bench.eval.engine.evaluate`: torchattacks PGD, audit, final
  forward, packed bits, one SQLite transaction) against a hand-written loop of 20
  forward+backward passes (gradient w.r.t. the input) on the same model and batch;
  target >= 0.95.
- FGSM at 3 radii (one shared gradient) against FGSM at 1 radius; the harness's floor is
  (F+B + 3F) / (F+B + F): each radius needs its own forward pass to be classified.
Models are untrained (the cost does not depend on the weights), inputs are the synthetic
set's test images, written under --data-dir on first use.

    python benchmarks/bench_eval.py --models resnet20,resnet110
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from bench.core.environment import retain_freed_memory
from bench.eval.adapters import state_dict_defense
from bench.eval.engine import evaluate
from bench.eval.protocol import Cell, EvalConfig, Subject
from bench.eval.testdata import EvalData
from bench.records.load import load_records
from bench.records.store import RecordStore
from models import create_model

CELLS = {
    "clean": [Cell("clean")],
    "noise": [Cell("gaussian_noise", 0.0, 3)],
    "fgsm x1": [Cell("fgsm", 2.0)],
    "fgsm x3": [Cell("fgsm", 1.0), Cell("fgsm", 2.0), Cell("fgsm", 4.0)],
    "ifgsm-20": [Cell("ifgsm", 2.0)],
    "pgd-20": [Cell("pgd", 2.0)],
}


def harness_seconds(defense, data: EvalData, config: EvalConfig, cells: list[Cell]) -> float:
    """Wall time of `evaluate` on `cells` into a fresh store (the cells' recorded seconds)."""
    with tempfile.TemporaryDirectory() as results:
        subject = Subject(defense, defense.info.name, defense.info.name, 0)
        evaluate(subject, config, RecordStore(results), data, progress=False, cells=cells)
        return float(load_records(results)["seconds"].sum())


def hand_loop_seconds(model, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """`steps` forward+backward passes w.r.t. the input, nothing else."""
    began = time.perf_counter()
    for _ in range(steps):
        x_in = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(x_in), y), x_in)
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - began


def measure(name: str, args, data: EvalData, folder: Path) -> dict:
    torch.manual_seed(0)
    path = folder / f"{name}.pt"
    torch.save(create_model(name).state_dict(), path)
    defense = state_dict_defense(name, path, "synthetic", name=f"timed-{name}")
    config = EvalConfig(radii_255=(2.0,), n_test=args.n, batch_size=args.n, device=args.device)
    model = defense.model.to(args.device, memory_format=torch.channels_last)
    x, y = next(data.batches(Cell("clean"), args.n, args.device))
    x = x.contiguous(memory_format=torch.channels_last)
    best = {key: float("inf") for key in [*CELLS, "hand loop"]}
    harness_seconds(defense, data, config, CELLS["clean"])  # warm-up
    for _ in range(args.rounds):  # alternating, so that machine noise hits both sides alike
        for key, cells in CELLS.items():
            best[key] = min(best[key], harness_seconds(defense, data, config, cells))
            if key == "pgd-20":  # its baseline right after it
                best["hand loop"] = min(best["hand loop"], hand_loop_seconds(model, x, y, config.steps))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet20,resnet110")
    parser.add_argument("--n", type=int, default=128, help="test images (one batch)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.device == "cpu":
        retain_freed_memory()  # as run_bench.py does
    data = EvalData("synthetic", args.data_dir, EvalConfig(n_test=args.n))
    print(
        f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads, batch {args.n}, best of {args.rounds}"
    )
    columns = [f"{k} img/s" for k in CELLS] + [
        "PGD-20 vs hand loop",
        "FGSM 3 radii vs 1",
        "floor of that ratio",
    ]
    print("| model | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            best = measure(name, args, data, Path(folder))
            rates = " | ".join(f"{args.n / best[key]:.1f}" for key in CELLS)
            pgd_ratio = best["hand loop"] / best["pgd-20"]
            fgsm_ratio = best["fgsm x3"] / best["fgsm x1"]
            gradient, forward = best["hand loop"] / 20, best["clean"]
            floor = (gradient + 3 * forward) / (gradient + forward)  # one gradient, k classifying forwards
            print(f"| {name} | {rates} | {pgd_ratio:.3f} | {fgsm_ratio:.2f} | {floor:.2f} |")


if __name__ == "__main__":
    main()
