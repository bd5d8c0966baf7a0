"""A data set's clean splits as the benchmark reads them: test and training images, their
digest, a deterministic (class-balanced) subset, device batches, and each training set read
once for all who ask (`TrainingSets`). `dataset` is a name of the registry
(`bench.data.datasets`); every function takes the data dir explicitly (default:
`$INRES_BENCH_DATA` or ./data). The noise groups' files are bench.data.noise_files'.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterator

import numpy as np
import torch

from bench.data.cifar import ImageSet
from bench.data.datasets import dataset_info, is_present

log = logging.getLogger(__name__)


def load_test(dataset: str, data_dir: str | os.PathLike | None = None) -> ImageSet:
    info = dataset_info(dataset)
    return info.load(info, "test", data_dir)


def load_train(dataset: str, data_dir: str | os.PathLike | None = None) -> ImageSet:
    info = dataset_info(dataset)
    return info.load(info, "train", data_dir)


def images_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """The data digest of images read into memory (a test split): sha256 of their bytes."""
    return hashlib.sha256(np.ascontiguousarray(images).tobytes() + labels.tobytes()).hexdigest()


class TrainingSets:
    """Each data set's training images, read at most once for all who ask (the --n-train
    check, the digests of finished checkpoints, the estimate of every training task), and
    dropped with this object."""

    def __init__(self, data_dir: str | None):
        self.data_dir = data_dir
        self._sets: dict = {}
        self._sizes: dict = {}

    def present(self, dataset: str) -> bool:
        return is_present(dataset_info(dataset), self.data_dir)

    def images(self, dataset: str) -> ImageSet:
        if dataset not in self._sets:
            self._sets[dataset] = load_train(dataset, self.data_dir)
        return self._sets[dataset]

    def size(self, dataset: str) -> int:
        """The training images there are (the release's count when the files are not here yet)."""
        if dataset not in self._sizes:
            self._sizes[dataset] = (
                len(self.images(dataset)) if self.present(dataset) else dataset_info(dataset).sizes[0]
            )
        return self._sizes[dataset]

    def per_epoch(self, dataset: str, n_train: int | None) -> int:
        """The images one epoch trains on: the training set cut to `n_train`."""
        total = self.size(dataset)
        return min(n_train or total, total)


# --- subsets, views, batches ---------------------------------------------------------------


# How a test subset of n images is drawn: the first n that take n / classes of each class
# (this project's: class-balanced), or the first n (RobustBench's n_examples).
BALANCED, FIRST = "balanced", "first"
SUBSET_RULES = (BALANCED, FIRST)


def subset_indices(labels: np.ndarray, n: int | None = None, balanced: bool = False) -> np.ndarray:
    """Indices of a deterministic test subset: all (n None), the first n, or the first n
    that take n / classes images of each class (classes in label order get one more while
    n does not divide evenly), in their original order. `n` >= 1 (EvalConfig's check)."""
    if n is None or n >= len(labels):
        return np.arange(len(labels))
    if not balanced:
        return np.arange(n)
    classes = np.unique(labels)
    quota = np.zeros(labels.max() + 1, dtype=np.int64)
    quota[classes] = n // len(classes) + (np.arange(len(classes)) < n % len(classes))
    rank = np.zeros(len(labels), dtype=np.int64)  # how many of the same class came before
    for c in classes:
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return np.flatnonzero(rank < quota[labels])


def batches(
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int,
    device: torch.device | str = "cpu",
    rows: np.ndarray | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (x, y): x float32 N x 3 x H x W in [0, 1] on `device`, y int64. Only uint8
    crosses to the device (4x less traffic); the conversion happens there."""
    rows = np.arange(len(labels)) if rows is None else rows
    for start in range(0, len(rows), batch_size):
        take = rows[start : start + batch_size]
        x = torch.from_numpy(np.ascontiguousarray(images[take])).to(device, non_blocking=True)
        y = torch.from_numpy(labels[take]).to(device, non_blocking=True)
        yield x.permute(0, 3, 1, 2).float().div_(255), y
