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

import hashlib
import logging
import os
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import numpy as np
import pandas as pd

from bench.core.messages import disk_full, disk_full_message
from bench.records.integrity import check_integrity
from bench.records.schema import (
    CELL_COLUMNS,
    CHECK_COLUMNS,
    COLUMNS,
    DB_FILE,
    DEFENSE_COLUMNS,
    KEY,
    LANDSCAPE_COLUMNS,
    MEMBER_COLUMNS,
    RUN_COLUMNS,
    STABILITY_COLUMNS,
    UNIT_COLUMNS,
    quoted,
    table_statements,
)
from bench.records.sql import execute, open_store, typed
from models import UserError

log = logging.getLogger(__name__)


class RecordStore:
    """The records of one results dir, checked when opened. For writing (the default) the
    store is created when missing and proven writable; `readonly` opens an existing store,
    or none. Each `add_*` call is one transaction."""

    def __init__(self, results_dir: str | os.PathLike, readonly: bool = False):
        self.path, self.readonly = check_results_dir(results_dir) / DB_FILE, readonly
        if readonly:
            if self.path.is_file():
                with self._connect() as db:
                    check_integrity(db, self.path)
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(
                f"cannot create the results dir {self.path.parent} ({err.strerror}): choose another --results-dir"
            ) from None
        with self._connect() as db:
            check_integrity(db, self.path)
            try:
                # a store's tables exist: nothing written
                with db:
                    db.executescript(";".join(table_statements().values()))
                with open(self.path, "r+b"):  # SQLite opens a read-only file without a word; this does not
                    pass  # nor does it change the file: a run that finds everything cached leaves it as it was
            except (sqlite3.Error, OSError) as err:
                if disk_full(err) is not None:
                    raise UserError(disk_full_message(err, f"to write records to {self.path}")) from None
                raise UserError(
                    f"cannot write records to {self.path} ({getattr(err, 'strerror', None) or err}): make it writable "
                    "or choose another --results-dir"
                ) from None

    def _connect(self) -> closing[sqlite3.Connection]:
        if self.readonly:
            return closing(open_store(self.path, readonly=True))
        return closing(open_store(self.path))

    def cells(self, context: dict) -> pd.DataFrame:
        """The cells (COLUMNS) of one checkpoint's evaluation: `context` gives every KEY
        column but the CELL_COLUMNS (further keys are ignored)."""
        if self.readonly and not self.path.is_file():
            return typed(pd.DataFrame(columns=list(COLUMNS)), COLUMNS)
        fixed = [k for k in KEY if k not in CELL_COLUMNS]
        where = " AND ".join(f"{k} = ?" for k in fixed)
        with self._connect() as db:
            rows = execute(
                db,
                self.path,
                f"SELECT {', '.join(COLUMNS)} FROM cells WHERE {where}",
                [context[k] for k in fixed],
            )
        return typed(pd.DataFrame.from_records(rows, columns=list(COLUMNS)), COLUMNS)

    def done(self, context: dict) -> set[tuple]:
        """The CELL_COLUMNS of the finished cells matching `context` (see `cells`)."""
        return set(self.cells(context)[list(CELL_COLUMNS)].itertuples(index=False, name=None))

    def recorded_checks(self, context: dict) -> set[str]:
        """The checks recorded for the checkpoint `context` names."""
        if self.readonly and not self.path.is_file():
            return set()
        keys = ("run", "dataset", "seed", "members", "checkpoint_sha256")
        sql = f'SELECT "check" FROM checks WHERE {" AND ".join(f"{k} = ?" for k in keys)}'
        with self._connect() as db:
            return {c for (c,) in execute(db, self.path, sql, [context[k] for k in keys])}

    def perturbations(self, preset: str) -> set[tuple[str, float]]:
        """(perturbation, eps_255) of every recorded cell of `preset`."""
        if self.readonly and not self.path.is_file():
            return set()
        sql = "SELECT DISTINCT perturbation, eps_255 FROM cells WHERE preset = ?"
        with self._connect() as db:
            return {(p, float(e)) for p, e in execute(db, self.path, sql, [preset])}

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
        seen = [c for c in RUN_COLUMNS if c != "timestamp"]
        last = f"SELECT {', '.join(seen)} FROM runs WHERE run = ? AND dataset = ? AND seed = ? ORDER BY rowid DESC LIMIT 1"
        with self._connect() as db, db:
            if db.execute(last, [row["run"], row["dataset"], row["seed"]]).fetchall() == [
                tuple(row[c] for c in seen)
            ]:
                return  # the latest sighting already says so: a cached rerun leaves the store as it was
            db.execute(
                f"DELETE FROM runs WHERE {' AND '.join(f'{k} = ?' for k in key)}", [row[k] for k in key]
            )
            db.execute(insert, [row[k] for k in RUN_COLUMNS])

    def add_checks(self, rows: Sequence[dict]) -> None:
        """Record sanity-check results; a check run again on the same checkpoint replaces
        its earlier result."""
        names = ", ".join(quoted(k) for k in CHECK_COLUMNS)
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
            if not execute(
                db, self.path, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'stability'"
            ):
                return set()  # a read-only store written before the stage existed
            return set(execute(db, self.path, sql, [context[k] for k in keys]))

    def add_stability(self, rows: Sequence[dict], values: Sequence[np.ndarray]) -> int:
        """Insert one stability unit's rows and per-image values, all or nothing; returns
        how many were new."""
        names = [*STABILITY_COLUMNS, "per_image"]
        data = [
            [row[k] for k in STABILITY_COLUMNS] + [np.asarray(v, dtype="<f4").tobytes()]
            for row, v in zip(rows, values, strict=True)
        ]
        sql = f"INSERT OR IGNORE INTO stability ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        with self._connect() as db, db:
            before = db.total_changes
            db.executemany(sql, data)
            return db.total_changes - before

    def landscapes_done(self, context: dict) -> set[tuple]:
        """(image_group, image_row, data_sha256, eps_255, points, direction_seed) of the
        Fig. 2 landscapes recorded for the checkpoint `context` names."""
        if self.readonly and not self.path.is_file():
            return set()
        keys = ("run", "dataset", "seed", "checkpoint_sha256")
        sql = (
            f"SELECT image_group, image_row, data_sha256, eps_255, points, direction_seed FROM landscapes "
            f"WHERE {' AND '.join(f'{k} = ?' for k in keys)}"
        )
        with self._connect() as db:
            if not execute(
                db, self.path, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'landscapes'"
            ):
                return set()  # a read-only store written before landscapes were recorded
            return set(execute(db, self.path, sql, [context[k] for k in keys]))

    def add_landscape(self, row: dict, loss: np.ndarray, classes: np.ndarray) -> int:
        """Insert one landscape (its grids as blobs); returns 1 when it was new."""
        names = [*LANDSCAPE_COLUMNS, "loss", "classes"]
        values = [row[k] for k in LANDSCAPE_COLUMNS] + [
            np.asarray(loss, "<f4").tobytes(),
            np.asarray(classes, "<i2").tobytes(),
        ]
        sql = f"INSERT OR IGNORE INTO landscapes ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        with self._connect() as db, db:
            before = db.total_changes
            db.execute(sql, values)
            return db.total_changes - before

    def defense_build(self, run: str, dataset: str, checkpoint_sha256: str) -> str | None:
        """The build recorded for a defense's weights, or None."""
        if self.readonly and not self.path.is_file():
            return None
        sql = "SELECT build FROM defenses WHERE run = ? AND dataset = ? AND checkpoint_sha256 = ?"
        with self._connect() as db:
            if not execute(
                db, self.path, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'defenses'"
            ):
                return None  # a read-only store written before defenses were recorded
            found = execute(db, self.path, sql, [run, dataset, checkpoint_sha256])
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


def content_digest(results_dir: str | os.PathLike) -> str:
    """A digest of what the results dir's store holds, that changes with any row added,
    replaced or removed: each table's row count and last rowid (rows are inserted, or
    replaced under a new rowid), and the runs' rows but for the time each run was last seen
    (every run records its sighting again). Read-only, after SQLite's integrity check: a
    corrupt store is named as such before any row is read."""
    path = check_results_dir(results_dir) / DB_FILE
    digest = hashlib.sha256()
    if not path.is_file():
        return digest.hexdigest()
    with closing(open_store(path, readonly=True)) as db:
        check_integrity(db, path)
        tables = [
            t
            for (t,) in execute(db, path, "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        ]
        for table in (t for t in tables if t != "runs"):
            digest.update(
                repr((table, *execute(db, path, f"SELECT count(*), max(rowid) FROM {table}")[0])).encode()
            )
        if "runs" in tables:
            seen = [c for c in RUN_COLUMNS if c != "timestamp"]
            digest.update(
                repr(sorted(execute(db, path, f"SELECT {', '.join(seen)} FROM runs"), key=repr)).encode()
            )
    return digest.hexdigest()


def check_results_dir(results_dir: str | os.PathLike) -> Path:
    """One error line for a results dir that cannot be one (empty name, a file)."""
    if not str(results_dir).strip():
        raise UserError("--results-dir is empty: give a folder (default: results)")
    path = Path(results_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--results-dir {path} is a file, not a folder: choose another --results-dir")
    return path


# --- opening, checking and reading the store ----------------------------------------
