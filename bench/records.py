"""Tidy, append-only evaluation records in `results/records.sqlite`.

One row per cell: model x data set x seed (or ensemble) x perturbation x radius or
severity, with the cell's correctness per test example packed into bits, so worst-case
and ensemble analyses never need recomputing. Every cell is one SQLite transaction: a
killed run loses at most the cell in flight, and several processes (one per seed on a
GPU) can share one store. Rows are only ever inserted; a row is *stale* when a newer row
of the same model, data set and seed names another checkpoint digest (the model was
retrained), and readers drop stale rows unless asked for them.

Units: `eps_255` and `alpha_255` in 1/255 of the pixel range; `severity` 1-5 for noise
cells (0 otherwise; `with_pooled_noise` adds the paper's all-severity numbers as
severity 0); `seed` is -1 for an ensemble of `members` seeds; `accuracy` in [0, 1].
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from models import UserError
from models.checkpoints import atomic_write

from .noise import NOISE_GROUPS, SEVERITIES

DB_FILE, SNAPSHOT_FILE = "records.sqlite", "records.csv"
ENSEMBLE_SEED = -1

# name -> SQL type; the order of the CSV snapshot's columns.
COLUMNS: dict[str, str] = {
    "model": "TEXT",  # registered name or the defense's name
    "run": "TEXT",  # checkpoint folder tag: the model plus every option that changed its weights
    "family": "TEXT",
    "dataset": "TEXT",
    "data_source": "TEXT",  # released, generated or synthetic
    "seed": "INTEGER",
    "members": "INTEGER",  # 1, or the ensemble's size
    "perturbation": "TEXT",  # clean, a noise group, fgsm, ifgsm, pgd
    "eps_255": "REAL",
    "severity": "INTEGER",
    "n": "INTEGER",
    "correct": "INTEGER",
    "accuracy": "REAL",
    "preset": "TEXT",
    "alpha_255": "REAL",  # step size of ifgsm / pgd (0 for other cells)
    "steps": "INTEGER",  # of ifgsm / pgd (0 for other cells)
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
    "alpha_255",
    "steps",
    "checkpoint_sha256",
)
# The KEY columns that tell the cells of one model x data set x seed apart.
CELL_COLUMNS = ("data_source", "perturbation", "eps_255", "severity", "alpha_255", "steps")
# Training runs the evaluation saw, failed ones included (reports count them).
RUN_COLUMNS: dict[str, str] = {
    "model": "TEXT",
    "run": "TEXT",
    "dataset": "TEXT",
    "seed": "INTEGER",
    "lambda_low": "REAL",
    "lambda_high": "REAL",
    "status": "TEXT",  # finished or failed
    "reason": "TEXT",
    "test_accuracy": "REAL",
    "checkpoint_sha256": "TEXT",
    "timestamp": "TEXT",
}


def _schema() -> str:
    cells = ", ".join(f"{k} {t}" for k, t in COLUMNS.items())
    runs = ", ".join(f"{k} {t}" for k, t in RUN_COLUMNS.items())
    return (
        f"CREATE TABLE IF NOT EXISTS cells ({cells}, correct_bits BLOB NOT NULL, UNIQUE ({', '.join(KEY)}));"
        f"CREATE TABLE IF NOT EXISTS runs ({runs}, UNIQUE (run, dataset, seed, checkpoint_sha256));"
    )


class RecordStore:
    """The records of one results dir. Each `add_*` call is one transaction."""

    def __init__(self, results_dir: str | os.PathLike):
        self.path = Path(results_dir) / DB_FILE
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as db, db:
                db.executescript(_schema())
        except (OSError, sqlite3.Error) as err:
            reason = getattr(err, "strerror", None) or err
            raise UserError(
                f"cannot write records to {self.path} ({reason}): choose another --results-dir"
            ) from None

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=120)  # other processes may hold the write lock briefly

    def done(self, context: dict) -> set[tuple]:
        """The CELL_COLUMNS of the finished cells matching `context`, which gives every other
        KEY column."""
        fixed = [k for k in KEY if k not in CELL_COLUMNS]
        where = " AND ".join(f"{k} = ?" for k in fixed)
        with closing(self._connect()) as db:
            rows = db.execute(
                f"SELECT {', '.join(CELL_COLUMNS)} FROM cells WHERE {where}", [context[k] for k in fixed]
            )
            return {(d, p, float(e), int(s), float(a), int(n)) for d, p, e, s, a, n in rows}

    def add_cells(self, rows: Sequence[dict], correct: Sequence[np.ndarray]) -> None:
        """Insert finished cells and their per-example correctness, all or nothing."""
        names = [*COLUMNS, "correct_bits"]
        values = [
            [row[k] for k in COLUMNS] + [np.packbits(np.asarray(bits, dtype=bool)).tobytes()]
            for row, bits in zip(rows, correct, strict=True)
        ]
        sql = f"INSERT OR IGNORE INTO cells ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        with closing(self._connect()) as db, db:
            db.executemany(sql, values)

    def add_run(self, row: dict) -> None:
        sql = f"INSERT OR IGNORE INTO runs ({', '.join(RUN_COLUMNS)}) VALUES ({', '.join('?' * len(RUN_COLUMNS))})"
        with closing(self._connect()) as db, db:
            db.execute(sql, [row[k] for k in RUN_COLUMNS])


def utc_now() -> str:
    """The records' timestamp format: UTC, ISO 8601, to the second."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_records(results_dir: str | os.PathLike, include_stale: bool = False) -> pd.DataFrame:
    """All cells as a DataFrame with COLUMNS plus `stale` (bool), without the bits."""
    frame = _read(results_dir, f"SELECT {', '.join(COLUMNS)} FROM cells", COLUMNS)
    by_time = frame.sort_values("timestamp", kind="stable")
    latest = by_time.groupby(["run", "dataset", "seed", "members"])["checkpoint_sha256"].transform("last")
    frame["stale"] = frame["checkpoint_sha256"] != latest.sort_index()
    return frame if include_stale else frame[~frame["stale"]].reset_index(drop=True)


def load_runs(results_dir: str | os.PathLike) -> pd.DataFrame:
    return _read(results_dir, f"SELECT {', '.join(RUN_COLUMNS)} FROM runs", RUN_COLUMNS)


def load_correct(results_dir: str | os.PathLike, **key) -> np.ndarray:
    """Per-example correctness (bool, in test-subset order) of the one cell matching `key`."""
    where = " AND ".join(f"{k} = ?" for k in key)
    with closing(sqlite3.connect(Path(results_dir) / DB_FILE)) as db:
        rows = db.execute(f"SELECT n, correct_bits FROM cells WHERE {where}", list(key.values())).fetchall()
    if len(rows) != 1:
        raise UserError(f"{len(rows)} cells match {key}; give more key columns ({', '.join(KEY)})")
    n, blob = rows[0]
    return np.unpackbits(np.frombuffer(blob, dtype=np.uint8), count=n).astype(bool)


def with_pooled_noise(frame: pd.DataFrame) -> pd.DataFrame:
    """Add, per model x data set x seed, the accuracy of each noise group over all five
    severities (the paper's Table 1 number) as rows with severity 0, where all five
    severity cells exist."""
    noise = frame[frame["perturbation"].isin(NOISE_GROUPS) & (frame["severity"] > 0)]
    group = [c for c in COLUMNS if c not in ("severity", "n", "correct", "accuracy", "seconds", "timestamp")]
    group += ["stale"] if "stale" in frame else []
    pooled = noise.groupby(group, dropna=False).agg(
        severities=("severity", "nunique"),
        n=("n", "sum"),
        correct=("correct", "sum"),
        seconds=("seconds", "sum"),
        timestamp=("timestamp", "max"),
    )
    pooled = pooled[pooled["severities"] == len(SEVERITIES)].drop(columns="severities").reset_index()
    pooled["severity"] = 0
    pooled["accuracy"] = pooled["correct"] / pooled["n"]
    return pd.concat([frame, pooled[frame.columns]], ignore_index=True)


def write_snapshot(results_dir: str | os.PathLike) -> Path:
    """records.csv beside the store (stale rows included and flagged), written atomically."""
    path = Path(results_dir) / SNAPSHOT_FILE
    text = load_records(results_dir, include_stale=True).to_csv(index=False)
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def _read(results_dir: str | os.PathLike, sql: str, columns: dict[str, str]) -> pd.DataFrame:
    path = Path(results_dir) / DB_FILE
    if not path.is_file():
        return _typed(pd.DataFrame(columns=list(columns)), columns)
    with closing(sqlite3.connect(path)) as db:
        return _typed(pd.read_sql_query(sql, db), columns)


def _typed(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    kinds = {"TEXT": object, "INTEGER": "int64", "REAL": "float64"}
    return frame.astype({k: kinds[t] for k, t in columns.items()})
