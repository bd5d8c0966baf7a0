"""The store read back: current rows (stale ones dropped unless asked for), runs, checks,
stability units, per-example bits, and the records.csv snapshot."""

from __future__ import annotations

import functools
import itertools
import os
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.records.checkpoints import (
    META_FILE,
    WEIGHTS_FILE,
    ensemble_digest,
    read_meta,
    weights_problem,
    zoo_checkpoint_dir,
)
from bench.records.schema import (
    CHECK_COLUMNS,
    COLUMNS,
    DB_FILE,
    KEY,
    LANDSCAPE_COLUMNS,
    MEMBER_COLUMNS,
    NO_TRAINING_DIGEST,
    RUN_COLUMNS,
    STABILITY_COLUMNS,
    quoted,
)
from bench.records.sql import execute, open_store, read_rows, typed
from models import UserError


def load_records(
    results_dir: str | os.PathLike, include_stale: bool = False, runs: pd.DataFrame | None = None
) -> pd.DataFrame:
    """All cells as a DataFrame with COLUMNS plus `stale` (bool), without the bits; `runs`:
    `load_runs(results_dir)` when the caller has it already."""
    frame = read_rows(results_dir, f"SELECT {', '.join(COLUMNS)} FROM cells ORDER BY rowid", COLUMNS)
    members = read_rows(
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
        cells["run"],
        cells["dataset"],
        cells["seed"],
        cells["members"],
        cells["checkpoint_sha256"],
        latest,
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
    sql = f"SELECT {', '.join(quoted(k) for k in CHECK_COLUMNS)} FROM checks"
    checks = read_rows(results_dir, sql, CHECK_COLUMNS, table="checks")
    members = read_rows(
        results_dir,
        f"SELECT {', '.join(MEMBER_COLUMNS)} FROM ensemble_members",
        MEMBER_COLUMNS,
        "ensemble_members",
    )
    stale = stale_rows(checks, load_runs(results_dir) if runs is None else runs, members)
    checks = checks[~stale].reset_index(drop=True)
    return checks.assign(passed=checks["value"] <= checks["limit"])


def load_stability(results_dir: str | os.PathLike, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """The stability rows of current checkpoints (STABILITY_COLUMNS plus `values`, each
    row's per-image float32 array); none for a store without the table."""
    frame, (values,) = _with_blobs(results_dir, "stability", STABILITY_COLUMNS, ("per_image",))
    frame["values"] = pd.Series(
        [np.frombuffer(v, dtype="<f4") for v in values], index=frame.index, dtype=object
    )
    members = read_rows(
        results_dir,
        f"SELECT {', '.join(MEMBER_COLUMNS)} FROM ensemble_members",
        MEMBER_COLUMNS,
        "ensemble_members",
    )
    stale = stale_rows(frame, load_runs(results_dir) if runs is None else runs, members)
    return frame[~stale].reset_index(drop=True)


def load_landscapes(results_dir: str | os.PathLike, runs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Fig. 2's landscapes of current checkpoints (LANDSCAPE_COLUMNS plus `loss` and
    `classes`, each a points x points array); none for a store without the table."""
    frame, (losses, classes) = _with_blobs(results_dir, "landscapes", LANDSCAPE_COLUMNS, ("loss", "classes"))
    for name, blobs, dtype in (("loss", losses, "<f4"), ("classes", classes, "<i2")):
        frame[name] = pd.Series(
            [np.frombuffer(b, dtype).reshape(g, g) for b, g in zip(blobs, frame["points"], strict=True)],
            index=frame.index,
            dtype=object,
        )
    single = frame.assign(members=1)  # one checkpoint each: stale when it is not the run's checkpoint now
    stale = stale_rows(
        single, load_runs(results_dir) if runs is None else runs, pd.DataFrame(columns=list(MEMBER_COLUMNS))
    )
    return frame[~stale].reset_index(drop=True)


def _with_blobs(
    results_dir: str | os.PathLike, table: str, columns: dict[str, str], blobs: tuple[str, ...]
) -> tuple[pd.DataFrame, list]:
    """A table's typed columns in rowid order, and each of its `blobs` columns as a list of
    bytes; empty for a store without the table."""
    path = Path(results_dir) / DB_FILE
    rows: list[tuple] = []
    if path.is_file():
        with closing(open_store(path, readonly=True)) as db:
            if execute(db, path, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", [table]):
                names = ", ".join([*(quoted(k) for k in columns), *blobs])
                rows = execute(db, path, f"SELECT {names} FROM {table} ORDER BY rowid")
    kept = len(columns)
    frame = typed(pd.DataFrame.from_records([r[:kept] for r in rows], columns=list(columns)), columns)
    return frame, [[r[kept + i] for r in rows] for i in range(len(blobs))]


def load_runs(results_dir: str | os.PathLike) -> pd.DataFrame:
    """One row per training run (run, data set, seed) ever seen, as it stands now: its
    checkpoint folder's meta.json decides `status` (finished, failed, running, or replaced
    when weights.pt now holds other weights), `checkpoint_sha256`, `length`, `n_train` and
    `train_sha256` (of its recipe); `on_disk` says whether its weights.pt is there. A folder
    deleted (or not copied along with records.sqlite) leaves the run as last recorded: the
    records are the evidence, and nothing has replaced what they measured."""
    runs = read_rows(results_dir, f"SELECT {', '.join(RUN_COLUMNS)} FROM runs ORDER BY rowid", RUN_COLUMNS)
    runs = runs.drop_duplicates(["run", "dataset", "seed"], keep="last").reset_index(drop=True)
    states = [
        checkpoint_state(zoo_checkpoint_dir(results_dir, dataset, run, seed) / META_FILE, status, sha)
        for run, dataset, seed, status, sha in zip(
            runs["run"], runs["dataset"], runs["seed"], runs["status"], runs["checkpoint_sha256"], strict=True
        )
    ]
    columns = ["status", "checkpoint_sha256", "length", "n_train", "train_sha256", "on_disk"]
    return runs.drop(columns=["status", "checkpoint_sha256"]).assign(
        **{
            c: pd.Series([s[i] for s in states], index=runs.index, dtype=object)
            for i, c in enumerate(columns)
        }
    )[[*RUN_COLUMNS, *columns[2:]]]


def checkpoint_state(
    meta_path: Path, recorded_status: str, recorded_sha256: str
) -> tuple[str, str, str | None, int | None, str, bool]:
    """(status, sha256, training length, training images, their digest, weights on disk) of
    a checkpoint folder's meta.json (NO_TRAINING_DIGEST when it names none); status "replaced" when weights.pt holds other weights than the
    sha256 names (its cells are stale). A missing meta.json gives the run as recorded (status
    and sha256 from the store). One error line when meta.json is damaged (its run's cells
    would silently drop out of every report)."""
    if not meta_path.exists():
        return recorded_status, recorded_sha256, None, None, NO_TRAINING_DIGEST, False
    meta = read_meta(meta_path)
    trained_on = meta.get("data", {}).get("sha256", NO_TRAINING_DIGEST)
    status = str(meta.get("status", "finished"))
    on_disk = (meta_path.parent / WEIGHTS_FILE).is_file()
    # holds other weights now
    if status == "finished" and on_disk and weights_problem(meta_path.parent, meta):
        status = "replaced"
    return status, meta["sha256"], meta.get("length"), meta.get("n_train"), trained_on, on_disk


def load_correct(results_dir: str | os.PathLike, **key: object) -> np.ndarray:
    """Per-example correctness (bool, in test-subset order) of the one cell matching `key`."""
    path = Path(results_dir) / DB_FILE
    where = " AND ".join(f"{k} = ?" for k in key)
    with closing(open_store(path, readonly=True)) as db:
        rows = execute(db, path, f"SELECT n, correct_bits FROM cells WHERE {where}", list(key.values()))
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
    with closing(open_store(path, readonly=True)) as db:
        rows = execute(db, path, f"SELECT {', '.join(KEY)}, correct_bits FROM cells")
    bits = {}
    for row in rows:
        key = dict(zip(KEY, row[:-1], strict=True))
        bits[cell_id(key)] = np.unpackbits(np.frombuffer(row[-1], dtype=np.uint8), count=key["n"]).astype(
            bool
        )
    return bits


def cell_id(row: Any) -> tuple:
    """A cell's KEY values as a hashable tuple (from a dict, a Series or a named tuple)."""
    get = row.get if hasattr(row, "get") else lambda k: getattr(row, k)
    return tuple(_plain(get(k)) for k in KEY)


def _plain(value: object) -> object:
    """numpy scalars as Python ones, so that keys from SQLite and from pandas compare equal."""
    return value.item() if isinstance(value, np.generic) else value
