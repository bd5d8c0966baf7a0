#!/usr/bin/env python
"""Training throughput: our loop against a plain PyTorch loop with a torchvision DataLoader.

Both train the same model (fresh copies, same SGD settings) at batch 128 on the same
uint8 images. Ours: the whole set on the device, crop + flip as one gather there, no
DataLoader (bench.train.loop.train_epoch, the code training runs). Plain: a Dataset yielding PIL
images through RandomCrop(32, padding=4) + RandomHorizontalFlip + ToTensor, DataLoader with
shuffle. Rounds alternate between the two, each going first in every other round; the
best round of each is kept. Prints
images/s and the ratio, measured in this one run.

    python benchmarks/bench_train.py                                  # CPU, four models
    python benchmarks/bench_train.py --device cuda --steps 50 --bf16 --channels-last
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train.epoch import epoch_generator, make_optimizer, train_epoch
from bench.train.recipes import (
    TrainConfig,
    recipe_for,  # noqa: E402
)
from models import create_model  # noqa: E402

DEFAULT_STEPS = {"resnet20": 10, "resnet110": 4, "resnet164": 3, "resnext29-8x64d": 2}


class PilImages(Dataset):
    """What torchvision's CIFAR10 does: one PIL image per item, transformed on the CPU."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose(
            [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor()]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def ours(name: str, images, labels, config: TrainConfig) -> float:
    model = create_model(name).to(config.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    recipe = recipe_for(model.info.family, "cifar10")
    opt = make_optimizer(model, recipe, config.device)
    x = torch.from_numpy(images).to(config.device).permute(0, 3, 1, 2)
    y = torch.from_numpy(labels).to(config.device)
    train_epoch(model, opt, x[:128], y[:128], recipe, epoch_generator(0, 0), config)  # warm-up
    _sync(config.device)
    start = time.perf_counter()
    train_epoch(model, opt, x, y, recipe, epoch_generator(0, 1), config)
    _sync(config.device)
    return len(labels) / (time.perf_counter() - start)


def plain(name: str, images, labels, config: TrainConfig, workers: int) -> float:
    model = create_model(name).to(config.device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    loader = DataLoader(PilImages(images, labels), batch_size=128, shuffle=True, num_workers=workers)

    def step(x, y):
        x, y = x.to(config.device), y.to(config.device)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step(*next(iter(loader)))  # warm-up
    _sync(config.device)
    start = time.perf_counter()
    for x, y in loader:
        step(x, y)
    _sync(config.device)
    return len(labels) / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_STEPS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=None, help="batches per measurement (default per model)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers of the plain loop")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    config = TrainConfig(
        "", "cifar10", 0, device=args.device, bf16=args.bf16, channels_last=args.channels_last
    )
    print(
        f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, batch 128, "
        f"best of {args.rounds} alternating rounds, plain loop with {args.workers} DataLoader workers"
    )
    print(f"{'model':18s} {'ours img/s':>11s} {'plain img/s':>12s} {'ratio':>6s}")
    for name in args.models.split(","):
        best = measure(
            name, config, 128 * (args.steps or DEFAULT_STEPS.get(name, 4)), args.rounds, args.workers
        )
        print(
            f"{name:18s} {best['ours']:11.1f} {best['plain']:12.1f} {best['ours'] / best['plain']:6.2f}",
            flush=True,
        )


def measure(name: str, config: TrainConfig, n: int, rounds: int, workers: int) -> dict[str, float]:
    """Best images/s of each loop over `rounds`; each goes first in every other round (the
    second one runs on a warmer allocator)."""
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n)
    torch.manual_seed(0)
    runs = {
        "ours": lambda: ours(name, images, labels, config),
        "plain": lambda: plain(name, images, labels, config, workers),
    }
    best = {"ours": 0.0, "plain": 0.0}
    for r in range(rounds):
        for side in ("ours", "plain") if r % 2 == 0 else ("plain", "ours"):
            best[side] = max(best[side], runs[side]())
    return best


if __name__ == "__main__":
    main()
