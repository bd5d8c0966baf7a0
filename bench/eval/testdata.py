"""The one view of a data set's test images that cells, stability units, checks, the
driver and the estimate share: its class-balanced subsets, noise groups, each cell's data
source, size and digest; and one cache of them per process and run.

A dry run on a data dir that lacks the test set still answers every question but the
digest (from the release's sizes; a cell without a digest is never taken as cached):
a dry run writes and downloads nothing.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from bench.attacks.perturbations import NOISE, perturbation
from bench.data.cifar import ImageSet, data_root
from bench.data.datasets import dataset_info, is_present
from bench.data.noise_files import (
    NoiseImages,
    cell_sources,
    current_noise_file,
    load_noise,
    noise_digest,
    noise_file,
    severity_rows,
)
from bench.data.splits import BALANCED, batches, images_digest, load_test, subset_indices
from bench.eval.protocol import Cell, EvalConfig
from models import UserError


class EvalData:
    """The test set of one data set, its subsets (class-balanced, or RobustBench's first n) and its noise groups,
    loaded on first use. With `dry`, nothing is written (noise files' md5s are not kept
    beside them) and a data set not in the data dir yet is answered from its sizes."""

    def __init__(
        self, dataset: str, data_dir: str | os.PathLike | None, config: EvalConfig, dry: bool = False
    ):
        info = dataset_info(dataset)
        self.dataset, self.data_dir, self.config, self.dry = dataset, data_dir, config, dry
        self.present = not dry or is_present(info, data_dir)
        test = load_test(dataset, data_dir) if self.present else None
        self._test = test
        self.n_test = len(test) if test is not None else info.sizes[1]
        self.clean_source, self.noise_source = cell_sources(dataset, data_dir, config.noise_source)
        self.clean_digest = images_digest(test.images, test.labels) if test is not None else None
        self._digests: dict[str, str] = {}  # noise group -> its file's digest

    @functools.cache  # noqa: B019 (one EvalData per data set and run)
    def indices(self, n: int | None) -> np.ndarray:
        return subset_indices(self.test.labels, n, balanced=self.config.subset_rule == BALANCED)

    @property
    def test(self) -> ImageSet:
        """The test set (a dry run answers from the data set's sizes while it is absent)."""
        if self._test is None:
            raise RuntimeError(f"{self.dataset} is not in the data dir: a dry run reads no images")
        return self._test

    def check_sizes(self) -> None:
        """One error line when the config asks for more test images than there are (a
        suite's sizes are capped at them; a protocol of the user's is never shrunk in silence)."""
        asked = [("n_test", self.config.n_test), *((f"subsets {n}", k) for n, k in self.config.subsets)]
        for what, n in asked:
            if n is not None and n > self.n_test:
                raise UserError(
                    f"EvalConfig.{what} = {n:,} is more than the {self.n_test:,} test images of "
                    f"{self.dataset} in {data_root(self.data_dir)}: give at most {self.n_test:,}"
                )

    def n(self, cell: Cell) -> int:
        """How many test images `cell` is measured on."""
        if not self.present:
            return min(self.config.n_test_of(cell.perturbation) or self.n_test, self.n_test)
        return len(self.indices(self.config.n_test_of(cell.perturbation)))

    def source(self, cell: Cell) -> str:
        return self.noise_source if perturbation(cell.perturbation).kind == NOISE else self.clean_source

    def digest(self, cell: Cell) -> str | None:
        """What `cell` reads, as records.data_sha256: the test set's, or its noise file's
        (None while that file is not made yet, or in a dry run without the test set:
        nothing is generated to answer)."""
        if perturbation(cell.perturbation).kind == NOISE:
            return self._noise_digest(cell.perturbation) if self.present else None
        return self.clean_digest

    def _noise_digest(self, group: str) -> str | None:
        if group not in self._digests:
            # the file as a cell will read it: generated (again, for a changed test set) first
            if not self.dry:
                self._digests[group] = noise_digest(self.noise(group).path)
            else:  # a dry run generates nothing: a file still to be (re)generated has no digest yet
                path = noise_file(self.dataset, self.data_dir, self.config.noise_source, group)
                generated = self.noise_source != "released"
                if self.clean_digest is None or not current_noise_file(path, generated, self.clean_digest):
                    return None
                self._digests[group] = noise_digest(path, remember=False)
        return self._digests[group]

    @functools.cache  # noqa: B019
    def noise(self, group: str) -> NoiseImages:
        source = "released" if self.noise_source == "released" else "generated"
        return load_noise(self.dataset, group, self.data_dir, source, test=self._test)

    @functools.cache  # noqa: B019
    def file_stats(self, group: str, chunk: int = 5000) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel mean and std of a whole noise file (all severities), in [0, 1] units."""
        images = self.noise(group).images
        total, square = np.zeros(3), np.zeros(3)
        for start in range(0, len(images), chunk):
            part = images[start : start + chunk].reshape(-1, 3).astype(np.float64) / 255
            total += part.sum(0)
            square += (part * part).sum(0)
        count = images[:1, ..., 0].size * len(images)
        mean = total / count
        return mean, np.sqrt(square / count - mean**2)

    def batches(
        self, cell: Cell, batch_size: int, device: str | torch.device
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The images `cell` perturbs: its noise file's rows at its severity, or clean ones."""
        indices = self.indices(self.config.n_test_of(cell.perturbation))
        if perturbation(cell.perturbation).kind == NOISE:
            noise = self.noise(cell.perturbation)
            rows = severity_rows(indices, noise.n_per_severity, cell.severity)
            return batches(noise.images, noise.labels, batch_size, device, rows)
        return batches(self.test.images, self.test.labels, batch_size, device, indices)


_VIEWS: dict[tuple, EvalData] = {}


def test_data(
    dataset: str, data_dir: str | os.PathLike | None, config: EvalConfig, run_id: str, dry: bool = False
) -> EvalData:
    """The one EvalData per data set, data dir, test subsets and noise source of a run in
    this process (a seed's and an ensemble's configs differ in radii only): the driver,
    the estimate and an in-process worker share it. Read again in the next run (another
    `run_id`): a process serving several runs (the Python API, a Ray worker) must not
    measure files since replaced with the images it read before."""
    key = (
        run_id,
        dataset,
        None if data_dir is None else str(data_dir),
        config.n_test,
        config.subsets,
        config.subset_rule,
        config.noise_source,
        dry,
    )
    if key not in _VIEWS:
        for old in [k for k in _VIEWS if k[0] != run_id]:
            del _VIEWS[old]
        _VIEWS[key] = EvalData(dataset, data_dir, config, dry)
    return _VIEWS[key]
