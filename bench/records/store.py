"""Tidy, append-only evaluation records in `results/records.sqlite`.

One row per cell: model x data set x seed (or ensemble) x perturbation x radius or
severity, with the cell's correctness per test example packed into bits, so worst-case
and ensemble analyses never need recomputing. Every cell is one SQLite transaction: a
killed run loses at most the cell in flight, and several processes (one per seed on a
GPU) can share one store. Rows are only ever inserted.

A row is *current* when it measured the checkpoint that stands now, else *stale*:
- a model this project trained: the checkpoint folder decides. Rows of another digest
  (retrained), of a failed or running retrain, or of a deleted folder are stale;
- an ensemble: current while every member it was built from is current (members are
  recorded; for ensembles recorded before they were, the current checkpoints are tried);
- any other defense: the digest recorded last for its run, data set and seed.
Readers drop stale rows unless asked for them.

Units: `eps_255` (and the `alpha_255` of a parameter set) in 1/255 of the pixel range; `severity` 1-5 for noise
cells (0 otherwise); `seed` is -1 for an ensemble of `members` seeds; `accuracy` in [0, 1].
The store is checked (SQLite's integrity check) whenever it is opened for writing or a
report is made: a corrupt store is never written to.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from bench.core.files import atomic_write
from bench.records.checkpoints import META_FILE, ensemble_digest, read_meta, zoo_checkpoint_dir
from models import UserError
from models.errors import disk_full, disk_full_message

log = logging.getLogger(__name__)
DB_FILE, SNAPSHOT_FILE = "records.sqlite", "records.csv"
ENSEMBLE_SEED = -1
READ_TIMEOUT, WRITE_TIMEOUT = 30, 120  # seconds to wait for another process's lock

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
# Sanity checks run on a checkpoint (bench.eval.sanity): one row per check, the latest kept.
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


def _tables() -> dict[str, str]:
    """CREATE TABLE statement of every table, by name."""

    def table(name: str, columns: dict[str, str], extra: str) -> str:
        return f"CREATE TABLE IF NOT EXISTS {name} ({', '.join(f'{_q(k)} {t}' for k, t in columns.items())}, {extra})"

    return {
        "cells": table("cells", COLUMNS, f"correct_bits BLOB NOT NULL, UNIQUE ({', '.join(KEY)})"),
        "runs": table("runs", RUN_COLUMNS, "UNIQUE (run, dataset, seed, checkpoint_sha256)"),
        "ensemble_members": table("ensemble_members", MEMBER_COLUMNS, "UNIQUE (ensemble_sha256, seed)"),
        "checks": table("checks", CHECK_COLUMNS, 'UNIQUE (run, dataset, seed, members, checkpoint_sha256, "check")'),
        "stability": table("stability", STABILITY_COLUMNS, f"per_image BLOB NOT NULL, UNIQUE ({', '.join(STABILITY_KEY)})"),
        "defenses": table("defenses", DEFENSE_COLUMNS, "UNIQUE (run, dataset, checkpoint_sha256)"),
    }


class RecordStore:
    """The records of one results dir, checked when opened. For writing (the default) the
    store is created when missing and proven writable; `readonly` opens an existing store,
    or none. Each `add_*` call is one transaction."""

    def __init__(self, results_dir: str | os.PathLike, readonly: bool = False):
        self.path, self.readonly = check_results_dir(results_dir) / DB_FILE, readonly
        if readonly:
            if self.path.is_file():
                with self._connect() as db:
                    _check_integrity(db, self.path)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"cannot create the results dir {self.path.parent} ({err.strerror}): choose another --results-dir"
            ) from None
        with self._connect() as db:
            _check_integrity(db, self.path)
            try:
                _migrate(db, self.path)
                with db:
                    db.executescript(";".join(_tables().values()))
                    # a real write: SQLite opens a read-only file without a word
                    db.execute(f"PRAGMA user_version = {db.execute('PRAGMA user_version').fetchone()[0]}")
            except sqlite3.Error as err:
                if disk_full(err) is not None:
                    raise UserError(disk_full_message(err, f"to write records to {self.path}")) from None
                raise UserError(
                    f"cannot write records to {self.path} ({err}): make it writable or choose another --results-dir"
                ) from None

    def _connect(self) -> closing[sqlite3.Connection]:
        if self.readonly:
            return closing(_open(self.path, READ_TIMEOUT, readonly=True))
        return closing(_open(self.path, WRITE_TIMEOUT))

    def cells(self, context: dict) -> pd.DataFrame:
        """The cells (COLUMNS) of one checkpoint's evaluation: `context` gives every KEY
        column but the CELL_COLUMNS (further keys are ignored)."""
        if self.readonly and not self.path.is_file():
            return _typed(pd.DataFrame(columns=list(COLUMNS)), COLUMNS)
        fixed = [k for k in KEY if k not in CELL_COLUMNS]
        where = " AND ".join(f"{k} = ?" for k in fixed)
        with self._connect() as db:
            rows = _execute(
                db, self.path, f"SELECT {', '.join(COLUMNS)} FROM cells WHERE {where}", [context[k] for k in fixed]
            )
        return _typed(pd.DataFrame.from_records(rows, columns=list(COLUMNS)), COLUMNS)

    def done(self, context: dict) -> set[tuple]:
        """The CELL_COLUMNS of the finished cells matching `context` (see `cells`)."""
        return set(self.cells(context)[list(CELL_COLUMNS)].itertuples(index=False, name=None))

    def recorded_checks(self, context: dict) -> set[str]:
        """The checks recorded for the checkpoint `context` names."""
        if self.readonly and not self.path.is_file():
            return set()
        keys = ("run", "dataset", "seed", "members", "checkpoint_sha256")
        sql = f"SELECT \"check\" FROM checks WHERE {' AND '.join(f'{k} = ?' for k in keys)}"
        with self._connect() as db:
            return {c for (c,) in _execute(db, self.path, sql, [context[k] for k in keys])}

    def perturbations(self, preset: str) -> set[tuple[str, float]]:
        """(perturbation, eps_255) of every recorded cell of `preset`."""
        if self.readonly and not self.path.is_file():
            return set()
        sql = "SELECT DISTINCT perturbation, eps_255 FROM cells WHERE preset = ?"
        with self._connect() as db:
            return {(p, float(e)) for p, e in _execute(db, self.path, sql, [preset])}

    def add_cells(self, rows: Sequence[dict], correct: Sequence[np.ndarray]) -> int:
        """Insert finished cells and their per-example correctness, all or nothing; returns
        how many were new (another process may have recorded the same cells)."""
        names = [*COLUMNS, "correct_bits"]
        values = [
            [row[k] for k in COLUMNS] + [np.packbits(np.asarray(bits, dtype=bool)).tobytes()]
            for row, bits in zip(rows, correct, strict=True)
        ]
        sql = f"INSERT OR IGNORE INTO cells ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        with self._connect() as db, db:
            before = db.total_changes
            db.executemany(sql, values)
            return db.total_changes - before

    def add_run(self, row: dict) -> None:
        """Record a sighting of a training run; the latest sighting of each (run, data set,
        seed) is stored last."""
        key = ("run", "dataset", "seed", "checkpoint_sha256")
        insert = f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})"
        with self._connect() as db, db:
            db.execute(f"DELETE FROM runs WHERE {' AND '.join(f'{k} = ?' for k in key)}", [row[k] for k in key])
            db.execute(insert, [row[k] for k in RUN_COLUMNS])

    def add_checks(self, rows: Sequence[dict]) -> None:
        """Record sanity-check results; a check run again on the same checkpoint replaces
        its earlier result."""
        names = ", ".join(_q(k) for k in CHECK_COLUMNS)
        sql = f"INSERT OR REPLACE INTO checks ({names}) VALUES ({', '.join('?' * len(CHECK_COLUMNS))})"
        with self._connect() as db, db:
            db.executemany(sql, [[row[k] for k in CHECK_COLUMNS] for row in rows])

    def stability_done(self, context: dict) -> set[tuple]:
        """The UNIT_COLUMNS of the stability units recorded for the checkpoint `context`
        names (its run, dataset, seed, members, preset and checkpoint_sha256)."""
        if self.readonly and not self.path.is_file():
            return set()
        keys = ("run", "dataset", "seed", "members", "preset", "checkpoint_sha256")
        sql = f"SELECT DISTINCT {', '.join(UNIT_COLUMNS)} FROM stability WHERE {' AND '.join(f'{k} = ?' for k in keys)}"
        with self._connect() as db:
            if not _execute(db, self.path, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'stability'"):
                return set()  # a read-only store written before the stage existed
            return set(_execute(db, self.path, sql, [context[k] for k in keys]))

    def add_stability(self, rows: Sequence[dict], values: Sequence[np.ndarray]) -> int:
        """Insert one stability unit's rows and per-image values, all or nothing; returns
        how many were new."""
        names = [*STABILITY_COLUMNS, "per_image"]
        data = [[row[k] for k in STABILITY_COLUMNS] + [np.asarray(v, dtype="<f4").tobytes()]
                for row, v in zip(rows, values, strict=True)]  # fmt: skip
        sql = f"INSERT OR IGNORE INTO stability ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        with self._connect() as db, db:
            before = db.total_changes
            db.executemany(sql, data)
            return db.total_changes - before

    def defense_build(self, run: str, dataset: str, checkpoint_sha256: str) -> str | None:
        """The build recorded for a defense's weights, or None."""
        if self.readonly and not self.path.is_file():
            return None
        sql = "SELECT build FROM defenses WHERE run = ? AND dataset = ? AND checkpoint_sha256 = ?"
        with self._connect() as db:
            if not _execute(db, self.path, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'defenses'"):
                return None  # a read-only store written before defenses were recorded
            found = _execute(db, self.path, sql, [run, dataset, checkpoint_sha256])
        return found[0][0] if found else None

    def add_defense(self, row: dict) -> None:
        """Record how a defense's weights were built (once: the first build stands)."""
        sql = f"INSERT OR IGNORE INTO defenses ({', '.join(DEFENSE_COLUMNS)}) VALUES ({', '.join('?' * len(DEFENSE_COLUMNS))})"
        with self._connect() as db, db:
            db.execute(sql, [row[k] for k in DEFENSE_COLUMNS])

    def add_ensemble(self, ensemble_sha256: str, run: str, dataset: str, members: dict[int, str]) -> None:
        """Record which checkpoints (seed -> digest) the ensemble `ensemble_sha256` holds."""
        sql = f"INSERT OR IGNORE INTO ensemble_members ({', '.join(MEMBER_COLUMNS)}) VALUES (?, ?, ?, ?, ?)"
        with self._connect() as db, db:
            db.executemany(sql, [(ensemble_sha256, run, dataset, s, d) for s, d in members.items()])


def check_results_dir(results_dir: str | os.PathLike) -> Path:
    """One error line for a results dir that cannot be one (empty name, a file)."""
    if not str(results_dir).strip():
        raise UserError("--results-dir is empty: give a folder (default: results)")
    path = Path(results_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--results-dir {path} is a file, not a folder: choose another --results-dir")
    return path


def needs_migration(results_dir: str | os.PathLike) -> bool:
    """Whether the store was written by a version before the `params` or `data_sha256` column."""
    path = Path(results_dir) / DB_FILE
    if not path.is_file():
        return False
    with closing(_open(path, READ_TIMEOUT, readonly=True)) as db:
        cells, stability = _columns(db, path, "cells"), _columns(db, path, "stability")
    return (bool(cells) and not {"params", "data_sha256"} <= set(cells)) or (bool(stability) and "data_sha256" not in stability)


def check_store(results_dir: str | os.PathLike) -> bool:
    """Whether a store exists in `results_dir`; a corrupt or unreadable one is an error."""
    path = Path(results_dir) / DB_FILE
    if not path.is_file():
        return False
    with closing(_open(path, READ_TIMEOUT, readonly=True)) as db:
        _check_integrity(db, path)
    return True


def utc_now() -> str:
    """The records' timestamp format: UTC, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_records(
    results_dir: str | os.PathLike, include_stale: bool = False, runs: pd.DataFrame | None = None
) -> pd.DataFrame:
    """All cells as a DataFrame with COLUMNS plus `stale` (bool), without the bits; `runs`:
    `load_runs(results_dir)` when the caller has it already."""
    frame = _read(results_dir, f"SELECT {', '.join(COLUMNS)} FROM cells ORDER BY rowid", COLUMNS)
    members = _read(
        results_dir,
        f"SELECT {', '.join(MEMBER_COLUMNS)} FROM ensemble_members",
        MEMBER_COLUMNS,
        table="ensemble_members",  # stores written before ensembles recorded their members
    )
    frame["stale"] = stale_rows(frame, load_runs(results_dir) if runs is None else runs, members)
    return frame if include_stale else frame[~frame["stale"]].reset_index(drop=True)


def stale_rows(cells: pd.DataFrame, runs: pd.DataFrame, members: pd.DataFrame) -> pd.Series:
    """Which cells did not measure the checkpoint that stands now (see the module
    docstring). `runs`: load_runs's current state of the trained runs; `members`: the
    ensemble_members table."""
    current = {
        (r, d, int(s)): sha if status == "finished" else None
        for r, d, s, status, sha in zip(
            runs["run"], runs["dataset"], runs["seed"], runs["status"], runs["checkpoint_sha256"], strict=True
        )
    }
    built_from: dict[str, list[tuple]] = {}
    for ens, r, d, s, sha in members[list(MEMBER_COLUMNS)].itertuples(index=False):
        built_from.setdefault(ens, []).append(((r, d, int(s)), sha))
    seeds_of: dict[tuple[str, str], list[str]] = {}
    for (run, dataset, _), sha in sorted(current.items()):
        seeds_of.setdefault((run, dataset), []).extend([sha] if sha else [])
    order = cells.sort_values("timestamp", kind="stable")
    latest = order.groupby(["run", "dataset", "seed", "members"])["checkpoint_sha256"].transform("last")
    latest = latest.reindex(cells.index)
    stale = []
    for run, dataset, seed, count, sha, last in zip(
        cells["run"], cells["dataset"], cells["seed"], cells["members"], cells["checkpoint_sha256"], latest,
        strict=True,
    ):
        key = (run, dataset, int(seed))
        if count == 1 and key in current:
            stale.append(current[key] != sha)
        elif count > 1 and sha in built_from:
            stale.append(any(current.get(k, s) != s for k, s in built_from[sha]))
        elif count > 1 and (run, dataset) in seeds_of:  # recorded before members were: try them
            stale.append(sha not in _ensembles_of(tuple(seeds_of[run, dataset]), int(count)))
        else:  # a defense of the user's
            stale.append(sha != last)
    return pd.Series(stale, index=cells.index, dtype=bool)


@functools.cache
def _ensembles_of(digests: tuple[str, ...], members: int) -> frozenset[str]:
    """The digests of every ensemble of `members` of these checkpoints, in any order (an
    ensemble's digest hashes its members' in the order they were given)."""
    pick = itertools.permutations if len(digests) <= 8 else itertools.combinations
    return frozenset(ensemble_digest(chosen) for chosen in pick(digests, members))


def load_checks(results_dir: str | os.PathLike, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """The sanity checks of current checkpoints (CHECK_COLUMNS plus `passed`)."""
    sql = f"SELECT {', '.join(_q(k) for k in CHECK_COLUMNS)} FROM checks"
    checks = _read(results_dir, sql, CHECK_COLUMNS, table="checks")
    members = _read(
        results_dir, f"SELECT {', '.join(MEMBER_COLUMNS)} FROM ensemble_members", MEMBER_COLUMNS, "ensemble_members"
    )
    stale = stale_rows(checks, load_runs(results_dir) if runs is None else runs, members)
    checks = checks[~stale].reset_index(drop=True)
    return checks.assign(passed=checks["value"] <= checks["limit"])


def load_stability(results_dir: str | os.PathLike, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """The stability rows of current checkpoints (STABILITY_COLUMNS plus `values`, each
    row's per-image float32 array); none for a store without the table."""
    names = ", ".join(_q(k) for k in STABILITY_COLUMNS)
    path = Path(results_dir) / DB_FILE
    rows: list[tuple] = []
    if path.is_file():
        with closing(_open(path, READ_TIMEOUT, readonly=True)) as db:
            if _execute(db, path, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'stability'"):
                rows = _execute(db, path, f"SELECT {names}, per_image FROM stability ORDER BY rowid")
    frame = _typed(pd.DataFrame.from_records([r[:-1] for r in rows], columns=list(STABILITY_COLUMNS)), STABILITY_COLUMNS)
    frame["values"] = pd.Series([np.frombuffer(r[-1], dtype="<f4") for r in rows], index=frame.index, dtype=object)
    members = _read(results_dir, f"SELECT {', '.join(MEMBER_COLUMNS)} FROM ensemble_members", MEMBER_COLUMNS,
                    "ensemble_members")  # fmt: skip
    stale = stale_rows(frame, load_runs(results_dir) if runs is None else runs, members)
    return frame[~stale].reset_index(drop=True)


def load_runs(results_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per training run (run, data set, seed) ever seen, as it stands now: its
    checkpoint folder decides `status` (finished, failed, running, or gone when the folder
    was deleted), `checkpoint_sha256`, `length` and `n_train` (of its recipe); the other
    columns come from its last sighting."""
    runs = _read(results_dir, f"SELECT {', '.join(RUN_COLUMNS)} FROM runs ORDER BY rowid", RUN_COLUMNS)
    runs = runs.drop_duplicates(["run", "dataset", "seed"], keep="last").reset_index(drop=True)
    states = [
        checkpoint_state(zoo_checkpoint_dir(results_dir, dataset, run, seed) / META_FILE)
        for run, dataset, seed in zip(runs["run"], runs["dataset"], runs["seed"], strict=True)
    ]
    columns = ["status", "checkpoint_sha256", "length", "n_train", "train_sha256"]
    return runs.drop(columns=["status", "checkpoint_sha256"]).assign(
        **{c: pd.Series([s[i] for s in states], index=runs.index, dtype=object) for i, c in enumerate(columns)}
    )[[*RUN_COLUMNS, *columns[2:]]]


def checkpoint_state(meta_path: Path) -> tuple[str, str | None, str | None, int | None, str | None]:
    """(status, sha256, training length, training images, their digest: UNKNOWN_DATA for a
    checkpoint trained before meta.json had it) of a checkpoint folder's meta.json;
    ("gone", None, None, None, None) when it is missing; one error line when it is damaged
    (its run's cells would silently drop out of every report)."""
    if not meta_path.exists():
        return "gone", None, None, None, None
    meta = read_meta(meta_path)
    trained_on = meta.get("data", {}).get("sha256", UNKNOWN_DATA)
    return str(meta.get("status", "finished")), meta["sha256"], meta.get("length"), meta.get("n_train"), trained_on


def load_correct(results_dir: str | os.PathLike, **key) -> np.ndarray:
    """Per-example correctness (bool, in test-subset order) of the one cell matching `key`."""
    path = Path(results_dir) / DB_FILE
    where = " AND ".join(f"{k} = ?" for k in key)
    with closing(_open(path, READ_TIMEOUT, readonly=True)) as db:
        rows = _execute(db, path, f"SELECT n, correct_bits FROM cells WHERE {where}", list(key.values()))
    if len(rows) != 1:
        raise UserError(f"{len(rows)} cells match {key}; give more key columns ({', '.join(KEY)})")
    n, blob = rows[0]
    return np.unpackbits(np.frombuffer(blob, dtype=np.uint8), count=n).astype(bool)


def load_bits(results_dir: str | os.PathLike) -> dict[tuple, np.ndarray]:
    """Every cell's per-example correctness (bool, test-subset order), keyed by its KEY
    values in KEY order: what worst cases and confidence intervals are computed from."""
    path = Path(results_dir) / DB_FILE
    if not path.is_file():
        return {}
    with closing(_open(path, READ_TIMEOUT, readonly=True)) as db:
        rows = _execute(db, path, f"SELECT {', '.join(KEY)}, correct_bits FROM cells")
    bits = {}
    for row in rows:
        key = dict(zip(KEY, row[:-1], strict=True))
        bits[cell_id(key)] = np.unpackbits(np.frombuffer(row[-1], dtype=np.uint8), count=key["n"]).astype(bool)
    return bits


def cell_id(row) -> tuple:
    """A cell's KEY values as a hashable tuple (from a dict, a Series or a named tuple)."""
    get = row.get if hasattr(row, "get") else lambda k: getattr(row, k)
    return tuple(_plain(get(k)) for k in KEY)


def _plain(value):
    """numpy scalars as Python ones, so that keys from SQLite and from pandas compare equal."""
    return value.item() if isinstance(value, np.generic) else value


def write_snapshot(results_dir: str | os.PathLike) -> Path:
    """records.csv beside the store (every row, stale ones included and flagged), written
    atomically."""
    path = Path(results_dir) / SNAPSHOT_FILE
    text = load_records(results_dir, include_stale=True).to_csv(index=False)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


# --- opening, checking, migrating and reading the store ----------------------------------------

# Before the `params` column, the iterative attacks' parameters had columns of their own.
OLD_ATTACK_COLUMNS = ("alpha_255", "steps")


def _q(name: str) -> str:
    """A column name quoted for SQL (`check` and `limit` are keywords)."""
    return f'"{name}"'


def _migrate(db: sqlite3.Connection, path: Path) -> None:
    """Rewrite a store of an older schema to this one, in place and in one transaction,
    every cell and stability unit keeping its numbers, bits and values: alpha_255 / steps
    columns become `params`; rows recorded before data digests get `data_sha256` "unknown"."""
    cells, stability = _columns(db, path, "cells"), _columns(db, path, "stability")
    old_cells = bool(cells) and not {"params", "data_sha256"} <= set(cells)
    old_stability = bool(stability) and "data_sha256" not in stability
    if not (old_cells or old_stability):
        return
    if old_cells and "params" not in cells and not set(OLD_ATTACK_COLUMNS) <= set(cells):
        raise UserError(_corrupt(path, f"unknown columns {', '.join(cells)}: not a store of this project"))
    log.info("migrating %s to the current records schema (once; its records are kept)", path)
    old = [c for c in cells if c not in OLD_ATTACK_COLUMNS]
    params = "params" if "params" in cells else "alpha_255, steps"
    rows = _execute(db, path, f"SELECT {', '.join(c for c in old if c != 'params')}, {params} FROM cells") if old_cells else []
    db.execute("BEGIN IMMEDIATE")
    try:
        if old_cells:
            db.execute("ALTER TABLE cells RENAME TO cells_before_migration")
            db.execute(_tables()["cells"])
            names = [*(c for c in old if c != "params"), "params", *(["data_sha256"] if "data_sha256" not in cells else [])]
            insert = f"INSERT INTO cells ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
            unknown = (UNKNOWN_DATA,) if "data_sha256" not in cells else ()
            if "params" in cells:
                db.executemany(insert, [(*row, *unknown) for row in rows])
            else:
                db.executemany(insert, [(*row[:-2], _old_params(*row[-2:]), *unknown) for row in rows])
            db.execute("DROP TABLE cells_before_migration")
        if old_stability:  # the unique key gains data_sha256: the table is made again, its rows copied
            kept = ", ".join(_q(c) for c in stability)
            db.execute("ALTER TABLE stability RENAME TO stability_before_migration")
            db.execute(_tables()["stability"])
            db.execute(f"INSERT INTO stability ({kept}, data_sha256) SELECT {kept}, ? FROM stability_before_migration",
                       [UNKNOWN_DATA])  # fmt: skip
            db.execute("DROP TABLE stability_before_migration")
        db.commit()
    except BaseException:
        db.rollback()
        raise


def _columns(db: sqlite3.Connection, path: Path, table: str) -> list[str]:
    return [row[1] for row in _execute(db, path, f"PRAGMA table_info({table})")]


def _old_params(alpha_255: float, steps: int) -> str:
    if not steps:
        return "{}"
    return json.dumps({"alpha_255": round(float(alpha_255), 6), "steps": int(steps)}, sort_keys=True, separators=(",", ":"))



def _open(path: Path, timeout: float, readonly: bool = False) -> sqlite3.Connection:
    try:
        if readonly:
            return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=timeout)
        return sqlite3.connect(path, timeout=timeout)
    except sqlite3.Error as err:
        raise UserError(
            f"cannot open {path} ({err}): check the permissions of {path.parent} or choose another --results-dir"
        ) from None


def _journal(path: Path) -> Path:
    return path.with_name(path.name + "-journal")


def recover(results_dir: str | os.PathLike) -> bool:
    """Roll back the write a killed process left half done (a hot journal beside the
    store), as SQLite does on the first writable open; True when there was one. Read-only
    readers cannot do it and say so (`_execute`)."""
    path = Path(results_dir) / DB_FILE
    if not (path.is_file() and _journal(path).is_file()):
        return False
    try:
        with closing(sqlite3.connect(path, timeout=WRITE_TIMEOUT)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchall()  # a hot journal is rolled back here
    except sqlite3.Error:
        return False  # a read-only mount, or a live writer still holds it: the readers say what to do
    recovered = not _journal(path).is_file()
    if recovered:
        log.info("records: rolled back a write to %s that a killed process left unfinished", path)
    return recovered


def _check_integrity(db: sqlite3.Connection, path: Path) -> None:
    """SQLite's own check of the file, then ours of the values: a row edited by hand (a
    radius 'abc', a NULL seed) is one error line naming it, not a ValueError in a report."""
    result = _execute(db, path, "PRAGMA integrity_check(1)")
    if result[0][0] != "ok":
        raise UserError(_corrupt(path, " ".join(str(result[0][0]).replace("*** in database main ***", "").split())))
    tables = {name for (name,) in _execute(db, path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    for table, columns in TABLE_COLUMNS.items():
        if table in tables:
            _check_columns(db, path, table, columns)
            _check_values(db, path, table, columns)
    if "cells" in tables:
        _check_bits(db, path)


def _check_bits(db: sqlite3.Connection, path: Path) -> None:
    """Each cell's bits count its `correct` examples, and nothing past its `n`: the worst
    case and the ensembles read the bits, the tables read `accuracy`, so the two must agree."""
    rows = _execute(db, path, "SELECT rowid, n, correct, correct_bits FROM cells")
    for rowid, n, correct, bits in rows:
        unpacked = np.unpackbits(np.frombuffer(bits, dtype=np.uint8))
        if int(unpacked[:n].sum()) != correct or unpacked[n:].any():
            raise UserError(
                f"{path.name} has a damaged row: cells row {rowid} ({_cell_named(db, path, rowid)}) holds correct_bits "
                f"with {int(unpacked.sum())} correct examples, not correct = {correct} (edited by hand?); nothing was "
                f"read or written: restore the store, or delete that row (sqlite3 {path} \"DELETE FROM cells WHERE "
                f"rowid = {rowid}\") and run again to recompute it"
            )


def _cell_named(db: sqlite3.Connection, path: Path, rowid: int) -> str:
    """A cell as a reader knows it: run, data set, seed, perturbation and radius or severity."""
    run, dataset, seed, kind, eps, severity = _execute(
        db, path, "SELECT run, dataset, seed, perturbation, eps_255, severity FROM cells WHERE rowid = ?", [rowid]
    )[0]
    where = f" severity {severity}" if severity else f" at {eps:g}/255" if isinstance(eps, int | float) and eps else ""
    return f"{run} {dataset} seed {seed}, {kind}{where}"


def _value_rules(table: str, columns: dict[str, str]) -> dict[str, tuple[str, str]]:
    """column -> (SQL condition every row meets, what it means): each value of its SQL
    type (NULL only where a column allows it), and counts and shares in their ranges."""
    typeof = {"TEXT": "('text')", "INTEGER": "('integer')", "REAL": "('real', 'integer')"}
    words = {"TEXT": "a string", "INTEGER": "an integer", "REAL": "a number"}
    ranges = {"n": ("{0} >= 1", "at least 1"), "members": ("{0} >= 1", "at least 1"),
              "block": ("{0} >= -1", "at least -1"), "damped": ("{0} IN (0, 1)", "0 or 1"),
              "severity": ("{0} BETWEEN 0 AND 5", "in 0-5"), "eps_255": ("{0} BETWEEN 0 AND 255", "in [0, 255]"),
              "accuracy": ("{0} BETWEEN 0 AND 1 AND abs({0} * n - correct) < 1e-6", "in [0, 1] and equal to correct / n"),
              "correct": ("{0} BETWEEN 0 AND n", "in [0, n]"),
              "test_accuracy": ("{0} BETWEEN 0 AND 1", "in [0, 1]"),
              "data_sha256": (f"(length({{0}}) = 64 OR {{0}} = '{UNKNOWN_DATA}')", f"of 64 hex digits or '{UNKNOWN_DATA}'")}  # fmt: skip
    rules = {}
    for name, kind in columns.items():
        condition, meaning = ranges.get(name, ("1", ""))
        rule, what = f"(typeof({{0}}) IN {typeof[kind]} AND ({condition}))", f"{words[kind]} {meaning}".strip()
        if name in NULLABLE:
            rule, what = f"({rule} OR typeof({{0}}) = 'null')", f"{what} or NULL"
        rules[name] = (rule, what)
    if table == "cells":
        rules["correct_bits"] = ("(typeof({0}) = 'blob' AND length({0}) = (n + 7) / 8)", "n bits, packed")
    if table == "stability":
        rules["per_image"] = ("(typeof({0}) = 'blob' AND length({0}) = 4 * n)", "n float32 values")
    return rules


def _check_columns(db: sqlite3.Connection, path: Path, table: str, columns: dict[str, str]) -> None:
    """A table of ours with columns of its own (another tool's `cells`): not a store of
    this project. Columns that `_migrate` adds (and the ones it replaces) may be missing."""
    present = set(_columns(db, path, table))
    missing = [c for c in columns if c not in present and c not in ("params", "data_sha256")]
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(_corrupt(path, f"its {table} table lacks the columns {shown}: not a store of this project"))


def _check_values(db: sqlite3.Connection, path: Path, table: str, columns: dict[str, str]) -> None:
    present = {row[1] for row in _execute(db, path, f"PRAGMA table_info({table})")}
    rules = {c: r for c, r in _value_rules(table, columns).items() if c in present}
    cases = " ".join(f"WHEN NOT {rule.format(_q(c))} THEN {i}" for i, (c, (rule, _)) in enumerate(rules.items()))
    sql = f"SELECT rowid, bad FROM (SELECT rowid, CASE {cases} END AS bad FROM {table}) WHERE bad IS NOT NULL LIMIT 1"
    found = _execute(db, path, sql)
    if found:
        rowid, index = found[0]
        column, (_, meaning) = list(rules.items())[index]
        (value,) = _execute(db, path, f"SELECT {_q(column)} FROM {table} WHERE rowid = ?", [rowid])[0]
        shown = f"{len(value)} bytes" if isinstance(value, bytes) else "NULL" if value is None else repr(value)
        named = f" ({_cell_named(db, path, rowid)})" if table == "cells" and column not in _NAMING else ""
        raise UserError(
            f"{path.name} has a damaged row: {table} row {rowid}{named} holds {column} = {shown}, not {meaning} (edited "
            f"by hand?); nothing was read or written: restore the store, or delete that row "
            f"(sqlite3 {path} \"DELETE FROM {table} WHERE rowid = {rowid}\") and run again to recompute it"
        )


_NAMING = ("run", "dataset", "seed", "perturbation", "eps_255", "severity")  # a cell's name: shown only when valid


def _execute(db: sqlite3.Connection, path: Path, sql: str, parameters: Sequence = ()) -> list[tuple]:
    """`sql`'s rows; a corrupt, foreign or locked store is one error line."""
    try:
        return db.execute(sql, parameters).fetchall()
    except sqlite3.OperationalError as err:
        if "locked" in str(err) or "busy" in str(err):
            raise UserError(
                f"{path} is locked by another process ({err}): wait for it to finish, then run again"
            ) from None
        if "no such column" in str(err):
            raise UserError(
                f"{path} was written by an older version ({err}): open it for writing once (any train, eval or "
                "report stage) to migrate it in place"
            ) from None
        if "no such table" in str(err):
            raise UserError(_corrupt(path, f"{err}: not a store of this project")) from None
        if "readonly database" in str(err) and _journal(path).is_file():  # SQLite must roll a hot journal back
            raise UserError(
                f"{path}: an interrupted write is pending in {_journal(path).name} (a writer was killed in the middle "
                "of a transaction): run any stage once (not --dry-run) to recover it; nothing was lost"
            ) from None
        raise UserError(f"cannot read {path} ({err}): check its permissions") from None
    except sqlite3.DatabaseError as err:  # not a database, malformed pages
        raise UserError(_corrupt(path, str(err))) from None


def _corrupt(path: Path, why: str) -> str:
    return (
        f"{path.name} is corrupt ({why}): nothing was written to it; move {path} aside and run again "
        f"to recompute its cells (`sqlite3 {path.name} .recover` may salvage rows; {SNAPSHOT_FILE} "
        "beside it holds the numbers of the last report)"
    )


def _read(results_dir: str | os.PathLike, sql: str, columns: dict[str, str], table: str = "") -> pd.DataFrame:
    """`sql`'s rows as typed columns; with `table`, none when a store predates that table."""
    path = Path(results_dir) / DB_FILE
    rows: list[tuple] = []
    if path.is_file():
        with closing(_open(path, READ_TIMEOUT, readonly=True)) as db:
            query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
            missing = [c for c in ("params", "data_sha256") if c in columns and not _has_column(db, path, c)]
            if missing:
                what = "a params column" if missing[0] == "params" else "their data's digest"
                raise UserError(
                    f"{path} was written before cells had {what}: open it for writing once "
                    "(any train, eval or report stage) to migrate it in place"
                )
            if not table or _execute(db, path, query, [table]):
                rows = _execute(db, path, sql)
    return _typed(pd.DataFrame.from_records(rows, columns=list(columns)), columns)


def _has_column(db: sqlite3.Connection, path: Path, column: str) -> bool:
    return any(row[1] == column for row in _execute(db, path, "PRAGMA table_info(cells)"))


def _typed(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    kinds = {"TEXT": object, "INTEGER": "int64", "REAL": "float64"}
    return frame.astype({k: kinds[t] for k, t in columns.items()})
