#!/usr/bin/env python
"""Time to generate the four noise groups x 5 severities x 10,000 images: our vectorised
generator against a straightforward per-image loop of the same formulas (float64, one
image at a time), in one run. Two loops: with numpy's legacy global generator, as the
published CIFAR-C code ran, and with numpy's current Generator.

    python benchmarks/bench_noise.py            # full size: 200,000 corrupted images
    python benchmarks/bench_noise.py --n 1000   # quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.data.noise import NOISE_GROUPS, NOISE_PARAMS, SEVERITIES, corrupt_groups  # noqa: E402


def per_image(image: np.ndarray, group: str, c: float, rng) -> np.ndarray:
    """The published formulas, written plainly for one image."""
    x = image / 255.0
    if group == "gaussian_noise":
        x = x + rng.normal(size=x.shape, scale=c)
    elif group == "speckle_noise":
        x = x + x * rng.normal(size=x.shape, scale=c)
    elif group == "shot_noise":
        x = rng.poisson(x * c) / c
    else:  # impulse_noise: each value replaced with probability c, by 0 or 1 with even odds
        flip, salt = rng.random(x.shape) < c, rng.random(x.shape) < 0.5
        x = np.where(flip, salt.astype(float), x)
    return np.uint8(np.clip(x, 0, 1) * 255)


def loop_all(images: np.ndarray, rng) -> None:
    for group in NOISE_GROUPS:
        for severity in SEVERITIES:
            c = NOISE_PARAMS[group][severity - 1]
            np.stack([per_image(img, group, c, rng) for img in images])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="test images per severity")
    args = parser.parse_args()
    images = np.random.default_rng(1).integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
    start = time.perf_counter()
    corrupt_groups(images, NOISE_GROUPS, seed=0)
    ours = time.perf_counter() - start
    loops = {}
    for name, rng in (
        ("legacy np.random", np.random.RandomState(0)),
        ("np Generator", np.random.default_rng(0)),
    ):
        start = time.perf_counter()
        loop_all(images, rng)
        loops[name] = time.perf_counter() - start
    total = len(NOISE_GROUPS) * len(SEVERITIES) * args.n
    print(f"{total:,} corrupted images (4 groups x 5 severities x {args.n:,})")
    print(f"vectorised: {ours:6.2f} s")
    for name, seconds in loops.items():
        print(f"per-image loop, {name:16s}: {seconds:6.2f} s   speed-up {seconds / ours:.1f}x")


if __name__ == "__main__":
    main()
