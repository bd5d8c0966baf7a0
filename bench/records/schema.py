"""The store's tables, their columns and SQLite types, their unique keys, and the values
that mark what is not a measurement (ENSEMBLE_SEED, UNKNOWN_DATA).

Units: `eps_255` (and a parameter set's `alpha_255`) in 1/255 of the pixel range;
`severity` 1-5 for noise cells (0 otherwise); `seed` -1 for an ensemble; `accuracy` in [0, 1]."""

from __future__ import annotations

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
    # the noise group file's and labels' md5s; "unknown" for cells recorded before digests
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


UNKNOWN_DATA = "unknown"  # the data digest of cells recorded before cells had one


# Training runs seen by the train and eval stages, failed ones included; the last sighting
# of each (run, data set, seed) comes last (rowid order).
RUN_COLUMNS: dict[str, str] = {
    "model": "TEXT",
    "run": "TEXT",
    "dataset": "TEXT",
    "seed": "INTEGER",
    "lambda_low": "REAL",
    "lambda_high": "REAL",
    "status": "TEXT",  # finished or failed (load_runs: also running, gone)
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
    "data_sha256": "TEXT",  # the test images read, as the cells' (UNKNOWN_DATA: recorded before digests)
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
    "run", "dataset", "data_source", "seed", "members", "preset", "checkpoint_sha256",
    "quantity", "perturbation", "eps_255", "block", "n", "params", "data_sha256",
)  # fmt: skip


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


# What tells a checkpoint's stability units apart (all rows of a unit are one transaction).
UNIT_COLUMNS = ("data_source", "quantity", "perturbation", "eps_255", "n", "params", "data_sha256")


TABLE_COLUMNS = {"cells": COLUMNS, "runs": RUN_COLUMNS, "checks": CHECK_COLUMNS, "ensemble_members": MEMBER_COLUMNS,
                 "stability": STABILITY_COLUMNS, "defenses": DEFENSE_COLUMNS}  # fmt: skip


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
        "checks": table("checks", CHECK_COLUMNS, 'UNIQUE (run, dataset, seed, members, checkpoint_sha256, "check")'),
        "stability": table("stability", STABILITY_COLUMNS, f"per_image BLOB NOT NULL, UNIQUE ({', '.join(STABILITY_KEY)})"),
        "defenses": table("defenses", DEFENSE_COLUMNS, "UNIQUE (run, dataset, checkpoint_sha256)"),
    }


def utc_now() -> str:
    """The records' timestamp format: UTC, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def quoted(name: str) -> str:
    """A column name quoted for SQL (`check` and `limit` are keywords)."""
    return f'"{name}"'
