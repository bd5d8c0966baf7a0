#!/usr/bin/env python
"""Cost of the damped skip: forward+backward images/s of ResNet vs its interpolated twins.

Two passes per model: `train` = forward + backward w.r.t. the parameters in train mode (a
training step without the optimiser), `input` = forward + backward w.r.t. the input in
eval mode with frozen parameters (one attack step). Rounds interleave the models in a
shuffled order, so that machine drift hits all alike, and the best round of each is kept
(the least disturbed by other load). Prints images/s and the ratio to the first model,
measured in this one run.

    python benchmarks/bench_models.py --models resnet110,in-resnet110,lambda-in-resnet110
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import create_model, resolve_models  # noqa: E402


def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str) -> float:
    start = time.perf_counter()
    if mode == "train":
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
    else:
        x = x.clone().requires_grad_(True)
        torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), x)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet110,in-resnet110,lambda-in-resnet110")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.manual_seed(0)
    names = resolve_models(args.models)
    x, y = torch.rand(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    built = {}
    for name in names:
        train = create_model(name).train()
        frozen = create_model(name).eval().requires_grad_(False)
        built[name] = {"train": train, "input": frozen}
        for mode, model in built[name].items():
            step(model, x, y, mode)  # warm-up: allocator, kernels
    times = {(n, m): [] for n in names for m in ("train", "input")}
    order, rng = list(names), random.Random(0)
    for _ in range(args.rounds):
        rng.shuffle(order)  # no model always runs first, right after the same neighbour
        for name in order:
            for mode, model in built[name].items():
                times[name, mode].append(step(model, x, y, mode))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"best of {args.rounds} interleaved rounds"
    )
    print(f"{'model':24s} {'train img/s':>12s} {'ratio':>7s} {'input img/s':>12s} {'ratio':>7s}")
    base = {m: args.batch / min(times[names[0], m]) for m in ("train", "input")}
    for name in names:
        rates = {m: args.batch / min(times[name, m]) for m in ("train", "input")}
        print(
            f"{name:24s} {rates['train']:12.1f} {rates['train'] / base['train']:7.3f} "
            f"{rates['input']:12.1f} {rates['input'] / base['input']:7.3f}"
        )


if __name__ == "__main__":
    main()
