"""SQLite access for the store: opening, quoting, reading into typed frames, and the one
error line for each way a store can fail (locked, older, foreign, corrupt, hot journal)."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path

import pandas as pd

from bench.core.files import check_not_link
from bench.records.schema import DB_FILE, SNAPSHOT_FILE
from models import UserError

READ_TIMEOUT, WRITE_TIMEOUT = 30, 120  # seconds to wait for another process's lock


SQLITE_PATH_LIMIT = 512  # characters SQLite's unix VFS takes for a file's path, its journal's included


def check_store_path(path: Path) -> None:
    """One error line when the store's path is too long for SQLite (which would say only
    "unable to open database file", read as a permissions problem)."""
    longest = len(str(path.absolute())) + len("-journal")
    if longest > SQLITE_PATH_LIMIT:
        raise UserError(
            f"cannot open {path}: its path (and its journal's) is {longest} characters, more than "
            f"SQLite's {SQLITE_PATH_LIMIT}; choose a shorter --results-dir"
        )


def open_store(path: Path, readonly: bool = False) -> sqlite3.Connection:
    check_store_path(path)
    try:
        if readonly:
            return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=READ_TIMEOUT)
        for written in (path, path.with_name(path.name + "-journal")):  # SQLite follows links
            check_not_link(written)
        return sqlite3.connect(path, timeout=WRITE_TIMEOUT)
    except sqlite3.Error as err:
        raise UserError(
            f"cannot open {path} ({err}): check the permissions of {path.parent} or choose another --results-dir"
        ) from None


def execute(db: sqlite3.Connection, path: Path, sql: str, parameters: Sequence = ()) -> list[tuple]:
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
                f"{path} was written by an earlier version of inres-bench ({err}): run again with a new "
                "--results-dir; the old store is left as it is"
            ) from None
        if "no such table" in str(err):
            raise UserError(corrupt_message(path, f"{err}: not a store of this project")) from None
        # SQLite must roll a hot journal back
        if "readonly database" in str(err) and journal_of(path).is_file():
            raise UserError(
                f"{path}: an interrupted write is pending in {journal_of(path).name} (a writer was killed in the middle "
                "of a transaction): run any stage once (not --dry-run) to recover it; nothing was lost"
            ) from None
        raise UserError(f"cannot read {path} ({err}): check its permissions") from None
    except sqlite3.DatabaseError as err:  # not a database, malformed pages
        raise UserError(corrupt_message(path, str(err))) from None


def read_rows(
    results_dir: str | os.PathLike, sql: str, columns: dict[str, str], table: str = ""
) -> pd.DataFrame:
    """`sql`'s rows as typed columns; with `table`, none when a store predates that table."""
    path = Path(results_dir) / DB_FILE
    rows: list[tuple] = []
    if path.is_file():
        with closing(open_store(path, readonly=True)) as db:
            query = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
            if not table or execute(db, path, query, [table]):
                rows = execute(db, path, sql)
    return typed(pd.DataFrame.from_records(rows, columns=list(columns)), columns)


def typed(frame: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    kinds = {"TEXT": object, "INTEGER": "int64", "REAL": "float64"}
    return frame.astype({k: kinds[t] for k, t in columns.items()})


def journal_of(path: Path) -> Path:
    return path.with_name(path.name + "-journal")


def corrupt_message(path: Path, why: str) -> str:
    return (
        f"{path.name} is corrupt ({why}): nothing was written to it; move {path} aside and run again "
        f"to recompute its cells (`sqlite3 {path.name} .recover` may salvage rows; {SNAPSHOT_FILE} "
        "beside it holds the numbers of the last report)"
    )
