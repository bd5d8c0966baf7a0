"""The store's tables, their columns and SQLite types, their unique keys, and the values
that mark what is not a measurement (ENSEMBLE_SEED).

Units: `eps_255` (and a parameter set's `alpha_255`) in 1/255 of the pixel range;
`severity` 1-5 for noise cells (0 otherwise); `seed` -1 for an ensemble; `accuracy` in [0, 1]."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

DB_FILE, SNAPSHOT_FILE = "records.sqlite", "records.csv"


ENSEMBLE_SEED = -1


# name -> SQL type; the order of the CSV snapshot's columns.
COLUMNS: dict[str, str] = {
    "model": "TEXT",  # registered name or the defense's name
    "run": "TEXT",  # checkpoint folder tag: the model plus every option that changed its weights
    "family": "TEXT",
    "dataset": "TEXT",
    # clean and attack cells: released (official files), unofficial, or the data set's name
    # (synthetic); noise cells: released, generated, generated-unofficial (from unofficial files)
    "data_source": "TEXT",
    # what the cell read: sha256 of the test images and labels (clean and attack cells), or of
    # the noise group file's and labels' md5s
    "data_sha256": "TEXT",
    "seed": "INTEGER",
    "members": "INTEGER",  # 1, or the ensemble's size
    "perturbation": "TEXT",  # clean, a noise group, fgsm, ifgsm, pgd
    "eps_255": "REAL",
    "severity": "INTEGER",
    "n": "INTEGER",
    "correct": "INTEGER",
    "accuracy": "REAL",
    "preset": "TEXT",
    "params": "TEXT",  # the perturbation's parameters, canonical JSON: {"alpha_255":2.0,"steps":20}, {}
    "lambda_low": "REAL",  # lambda_n ~ U[low, high] at init; empty for models without lambdas
    "lambda_high": "REAL",
    "checkpoint_sha256": "TEXT",
    "torch_version": "TEXT",
    "torchattacks_version": "TEXT",
    "device": "TEXT",
    "batch_size": "INTEGER",
    "seconds": "REAL",
    "timestamp": "TEXT",  # UTC, ISO 8601
}


# What makes two rows the same cell; a finished cell is never computed again.
KEY = (
    "run",
    "dataset",
    "data_source",
    "seed",
    "members",
    "perturbation",
    "eps_255",
    "severity",
    "n",
    "preset",
    "params",
    "checkpoint_sha256",
    "data_sha256",  # last: groupings in KEY order keep the order they had before it
)


# The KEY columns that tell the cells of one model x data set x seed apart.
CELL_COLUMNS = ("data_source", "perturbation", "eps_255", "severity", "n", "params", "data_sha256")


NO_TRAINING_DIGEST = "not known"  # load_runs' training digest of a run whose meta.json is gone or lacks it


# Training runs seen by the train and eval stages, failed ones included; the last sighting
# of each (run, data set, seed) comes last (rowid order).
RUN_COLUMNS: dict[str, str] = {
    "model": "TEXT",
    "run": "TEXT",
    "dataset": "TEXT",
    "seed": "INTEGER",
    "lambda_low": "REAL",
    "lambda_high": "REAL",
    "status": "TEXT",  # finished or failed (load_runs: also running, replaced)
    "reason": "TEXT",
    "test_accuracy": "REAL",
    "checkpoint_sha256": "TEXT",
    "timestamp": "TEXT",
}


# Sanity checks run on a checkpoint (bench.eval.model_checks): one row per check, the latest kept.
CHECK_COLUMNS: dict[str, str] = {
    "run": "TEXT",
    "dataset": "TEXT",
    "seed": "INTEGER",
    "members": "INTEGER",
    "checkpoint_sha256": "TEXT",
    "check": "TEXT",
    "value": "REAL",  # the measured figure (a share, points, a distance)
    "limit": "REAL",  # the value above which the check fails
    "detail": "TEXT",
    "timestamp": "TEXT",
}


# Which checkpoints an ensemble was built from (its own digest is a hash of theirs).
MEMBER_COLUMNS: dict[str, str] = {
    "ensemble_sha256": "TEXT",
    "run": "TEXT",
    "dataset": "TEXT",
    "seed": "INTEGER",
    "checkpoint_sha256": "TEXT",
}


# The stability stage (bench.eval.stability): one row per checkpoint x quantity x δ x block, its
# per-image values packed as float32 in `per_image` (test-subset order).
STABILITY_COLUMNS: dict[str, str] = {
    "model": "TEXT",
    "run": "TEXT",
    "family": "TEXT",
    "dataset": "TEXT",
    "data_source": "TEXT",
    "seed": "INTEGER",
    "members": "INTEGER",
    "preset": "TEXT",
    "checkpoint_sha256": "TEXT",
    "lambda_low": "REAL",
    "lambda_high": "REAL",
    "quantity": "TEXT",  # growth, spectral_norm, shifted_eigenvalue, input_gradient
    "perturbation": "TEXT",  # growth: the δ followed (fgsm, pgd, uniform, gaussian); else empty
    "eps_255": "REAL",  # growth: δ's radius; else 0
    "block": "INTEGER",  # growth: 0 stem, 1..N after block n, N + 1 logits; blocks 1..N; -1 whole network
    "damped": "INTEGER",  # 1 where the model's rule damps the block (the same positions in a ResNet)
    "n": "INTEGER",
    "params": "TEXT",  # the estimator's parameters, canonical JSON
    "data_sha256": "TEXT",  # the test images read, as the cells'
    "mean": "REAL",  # over the images (NULL when a value is not finite)
    "median": "REAL",
    "torch_version": "TEXT",
    "device": "TEXT",
    "seconds": "REAL",  # of the whole unit (every row of it)
    "timestamp": "TEXT",
}


# The stability stage's quantities (bench.eval.stability measures them, the reports read them),
# the perturbations whose growth it follows, and the least value each quantity can take (None:
# any real number; the rightmost eigenvalue of ∂g/∂x - I has no floor): norms and growth
# ratios are never negative.
GROWTH, SPECTRAL, EIGEN, GRADIENT = "growth", "spectral_norm", "shifted_eigenvalue", "input_gradient"
DELTAS = ("fgsm", "pgd", "uniform", "gaussian")
STABILITY_FLOORS: dict[str, float | None] = {GROWTH: 0.0, SPECTRAL: 0.0, EIGEN: None, GRADIENT: 0.0}


STABILITY_KEY = (
    "run",
    "dataset",
    "data_source",
    "seed",
    "members",
    "preset",
    "checkpoint_sha256",
    "quantity",
    "perturbation",
    "eps_255",
    "block",
    "n",
    "params",
    "data_sha256",
)


# How each defense of the user's was built (bench.eval.adapters.DefenseInfo.build): its cells are
# keyed by the weights' digest, so the same weights built otherwise (another factory or
# normalisation) must not find them; one row per defense, data set and weights.
DEFENSE_COLUMNS: dict[str, str] = {
    "run": "TEXT",
    "dataset": "TEXT",
    "checkpoint_sha256": "TEXT",
    "source": "TEXT",  # bench.eval.adapters.DefenseInfo.source
    "build": "TEXT",  # canonical JSON
    "timestamp": "TEXT",
}


# Fig. 2's loss landscapes (bench.eval.landscape), one row per checkpoint and image, with
# its loss (float32) and predicted-class (int16) grids of points x points as blobs: the
# figure is drawn from these rows alone.
LANDSCAPE_COLUMNS: dict[str, str] = {
    "model": "TEXT",
    "run": "TEXT",
    "dataset": "TEXT",
    "seed": "INTEGER",
    "checkpoint_sha256": "TEXT",
    "image_group": "TEXT",  # "clean", or the noise group the image is a row of (at severity 1)
    "image_row": "INTEGER",  # its row (of the test set, or of the group's file)
    "data_source": "TEXT",  # as the cells' (released, generated, ...)
    "data_sha256": "TEXT",  # the file the image was read from, as the cells'
    "eps_255": "REAL",  # the grid's radius on each direction, in 1/255
    "points": "INTEGER",  # grid points per axis
    "direction_seed": "INTEGER",  # d_orth's random signs
    "label": "INTEGER",  # the image's true class
    "right": "INTEGER",  # 1 when the network classifies the image itself right
    "torch_version": "TEXT",
    "device": "TEXT",
    "seconds": "REAL",
    "timestamp": "TEXT",
}
# Its images: the paper's "3rd image of the shot-noise group" and "8th of the speckle-noise
# group" of CIFAR-10-C. A group file starts with severity 1, so these are its rows 2 and 7:
# test images 2 and 7 at severity 1. Without the noise files: those two clean (LANDSCAPE_CLEAN).
PAPER_LANDSCAPE_IMAGES = (("shot_noise", 2), ("speckle_noise", 7))
LANDSCAPE_CLEAN = "clean"  # the image group of a clean test image


@dataclass(frozen=True)
class LandscapeConfig:
    """Fig. 2's grid, which tells its recorded landscapes apart: `points` per axis over
    [-radius, radius] / 255 on each direction, on the image `index` or the paper's two."""

    index: int | None = None  # one clean test image; None: the paper's two (PAPER_LANDSCAPE_IMAGES)
    points: int = 21
    radius: float = 8.0  # in 1/255
    seed: int = 0  # d_orth's random signs
    batch: int = 256  # grid points per forward pass


LANDSCAPE_KEY = (
    "run",
    "dataset",
    "seed",
    "checkpoint_sha256",
    "image_group",
    "image_row",
    "data_sha256",
    "eps_255",
    "points",
    "direction_seed",
)


# What tells a checkpoint's stability units apart (all rows of a unit are one transaction).
UNIT_COLUMNS = ("data_source", "quantity", "perturbation", "eps_255", "n", "params", "data_sha256")


TABLE_COLUMNS = {
    "cells": COLUMNS,
    "runs": RUN_COLUMNS,
    "checks": CHECK_COLUMNS,
    "ensemble_members": MEMBER_COLUMNS,
    "stability": STABILITY_COLUMNS,
    "defenses": DEFENSE_COLUMNS,
    "landscapes": LANDSCAPE_COLUMNS,
}


# no λ; a run that failed before its test; a stability figure that is not finite
NULLABLE = {"lambda_low", "lambda_high", "test_accuracy", "mean", "median"}


def table_statements() -> dict[str, str]:
    """CREATE TABLE statement of every table, by name."""

    def table(name: str, columns: dict[str, str], extra: str) -> str:
        return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(f'{quoted(k)} {t}' for k, t in columns.items())}, {extra})"

    return {
        "cells": table("cells", COLUMNS, f"correct_bits BLOB NOT NULL, UNIQUE ({', '.join(KEY)})"),
        "runs": table("runs", RUN_COLUMNS, "UNIQUE (run, dataset, seed, checkpoint_sha256)"),
        "ensemble_members": table("ensemble_members", MEMBER_COLUMNS, "UNIQUE (ensemble_sha256, seed)"),
        "checks": table(
            "checks", CHECK_COLUMNS, 'UNIQUE (run, dataset, seed, members, checkpoint_sha256, "check")'
        ),
        "stability": table(
            "stability", STABILITY_COLUMNS, f"per_image BLOB NOT NULL, UNIQUE ({', '.join(STABILITY_KEY)})"
        ),
        "defenses": table("defenses", DEFENSE_COLUMNS, "UNIQUE (run, dataset, checkpoint_sha256)"),
        "landscapes": table(
            "landscapes",
            LANDSCAPE_COLUMNS,
            f"loss BLOB NOT NULL, classes BLOB NOT NULL, UNIQUE ({', '.join(LANDSCAPE_KEY)})",
        ),
    }


def utc_now() -> str:
    """The records' timestamp format: UTC, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def quoted(name: str) -> str:
    """A column name quoted for SQL (`check` and `limit` are keywords)."""
    return f'"{name}"'
