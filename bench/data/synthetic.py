"""A deterministic, learnable 10-class stand-in for CIFAR-10, written in its exact format.

Each image is one of ten procedurally drawn shapes or textures (class = pattern), at a
random position, size and rotation, in a colour whose hue leans towards the class (so the
task is learnable in CPU-minutes, yet colour alone does not solve it), on a random
background with pixel noise. Everything is vectorised over the whole set and seeded.
It only exists to run the pipeline end to end: records made on it say `synthetic`.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from bench.core.files import atomic_write
from bench.data.cifar import write_batch

CLASSES = ("disk", "square", "ring", "cross", "triangle", "stripes", "checker", "dots", "half-disk", "bars")
TRAIN_BATCHES = 5  # data_batch_1..5, as CIFAR-10


def draw(
    n: int, rng: np.random.Generator, size: int = 32, classes: int = len(CLASSES)
) -> tuple[np.ndarray, np.ndarray]:
    """n images, uint8 (n, size, size, 3), and their labels, int64 (n,) in [0, classes),
    balanced. Shapes scale with `size` (their geometry is drawn for 32 pixels)."""
    if not 1 <= classes <= len(CLASSES):
        raise ValueError(f"classes must be in [1, {len(CLASSES)}], got {classes}")
    scale = size / 32
    labels = rng.permutation(np.arange(n) % classes)
    grid = np.arange(size, dtype=np.float32)[None, :, None]
    cx, cy = (rng.uniform(11 * scale, 21 * scale, n).astype(np.float32)[:, None, None] for _ in range(2))
    r = rng.uniform(6 * scale, 10 * scale, n).astype(np.float32)[:, None, None]
    theta = rng.uniform(0, np.pi, n).astype(np.float32)[:, None, None]
    dx, dy = grid.transpose(0, 2, 1) - cx, grid - cy  # dx varies along columns
    u = dx * np.cos(theta) + dy * np.sin(theta)
    w = -dx * np.sin(theta) + dy * np.cos(theta)
    period = rng.uniform(3.5 * scale, 5.5 * scale, n).astype(np.float32)[:, None, None]
    masks = np.stack(_patterns(u, w, r, period))  # (10, n, size, size)
    mask = masks[labels, np.arange(n)].astype(np.float32)[..., None]
    hue = (labels / classes + rng.normal(0, 0.12, n)) % 1.0
    fg = _hsv_to_rgb(hue, rng.uniform(0.5, 1.0, n), rng.uniform(0.6, 1.0, n))
    bg = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.4, n), rng.uniform(0.1, 0.5, n))
    img = mask * fg[:, None, None, :] + (1 - mask) * bg[:, None, None, :]
    img += rng.normal(0, 0.04, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), labels.astype(np.int64)


def _patterns(u: np.ndarray, w: np.ndarray, r: np.ndarray, period: np.ndarray) -> list[np.ndarray]:
    radius = np.sqrt(u * u + w * w)
    box = (np.abs(u) < r) & (np.abs(w) < r)
    wave = 2 * np.pi / period
    return [
        radius < r,  # disk
        np.maximum(np.abs(u), np.abs(w)) < 0.8 * r,  # square
        (radius > 0.55 * r) & (radius < r),  # ring
        ((np.abs(u) < 0.3 * r) | (np.abs(w) < 0.3 * r)) & box,  # cross
        (np.abs(u) < 0.6 * (w + 0.7 * r)) & (w < 0.7 * r),  # triangle
        (np.sin(w * wave) > 0) & box,  # stripes
        (np.sin(u * wave) * np.sin(w * wave) > 0) & box,  # checker
        (np.cos(u * wave) + np.cos(w * wave) > 1.0) & box,  # dots
        (radius < r) & (w > 0),  # half-disk
        (np.abs(np.abs(w) - 0.5 * r) < 0.22 * r) & (np.abs(u) < r),  # two bars
    ]


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0])[None, :] + h[:, None] * 6) % 6
    rgb = v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)
    return rgb.astype(np.float32)


def make_synthetic(
    folder: Path, n_train: int = 10_000, n_test: int = 2_000, seed: int = 0, size: int = 32, classes: int = 10
) -> None:
    """Write the set as a CIFAR-10 python folder: data_batch_1..5, test_batch, batches.meta."""
    rng = np.random.default_rng(seed)
    images, labels = draw(n_train, rng, size, classes)
    parts = np.array_split(np.arange(n_train), TRAIN_BATCHES)
    for i, part in enumerate(parts, start=1):
        write_batch(folder / f"data_batch_{i}", images[part], labels[part])
    write_batch(folder / "test_batch", *draw(n_test, rng, size, classes))
    meta = {
        "label_names": list(CLASSES[:classes]),
        "num_cases_per_batch": len(parts[0]),
        "num_vis": images[0].size,
    }
    atomic_write(folder / "batches.meta", lambda f: pickle.dump(meta, f, protocol=2))
