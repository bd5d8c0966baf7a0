"""What makes a store trustworthy before it is written to: SQLite's integrity check, the
columns and value ranges of every table, the packed bits, and the recovery of a hot
journal. A store of an earlier layout is refused in one line (no migration before a release)."""

from __future__ import annotations

import logging
import os
import sqlite3
from contextlib import closing
from pathlib import Path

import numpy as np

from bench.attacks.perturbations import RADIUS_LIMIT_255
from bench.records.schema import DB_FILE, NULLABLE, STABILITY_FLOORS, TABLE_COLUMNS, quoted
from bench.records.sql import WRITE_TIMEOUT, corrupt_message, execute, journal_of
from models import UserError

log = logging.getLogger(__name__)


def table_columns(db: sqlite3.Connection, path: Path, table: str) -> list[str]:
    return [row[1] for row in execute(db, path, f"PRAGMA table_info({table})")]


def recover(results_dir: str | os.PathLike) -> bool:
    """Roll back the write a killed process left half done (a hot journal beside the
    store), as SQLite does on the first writable open; True when there was one. Read-only
    readers cannot do it and say so (`execute`)."""
    path = Path(results_dir) / DB_FILE
    if not (path.is_file() and journal_of(path).is_file()):
        return False
    try:
        with closing(sqlite3.connect(path, timeout=WRITE_TIMEOUT)) as db:
            db.execute("SELECT count(*) FROM sqlite_master").fetchall()  # a hot journal is rolled back here
    except sqlite3.Error:
        return False  # a read-only mount, or a live writer still holds it: the readers say what to do
    recovered = not journal_of(path).is_file()
    if recovered:
        log.info("records: rolled back a write to %s that a killed process left unfinished", path)
    return recovered


def check_integrity(db: sqlite3.Connection, path: Path) -> None:
    """SQLite's own check of the file, then ours of the values: a row edited by hand (a
    radius 'abc', a NULL seed) is one error line naming it, not a ValueError in a report."""
    result = execute(db, path, "PRAGMA integrity_check(1)")
    if result[0][0] != "ok":
        raise UserError(
            corrupt_message(path, " ".join(str(result[0][0]).replace("*** in database main ***", "").split()))
        )
    _check_objects(db, path)
    tables = {name for (name,) in execute(db, path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    for table, columns in TABLE_COLUMNS.items():
        if table in tables:
            _check_columns(db, path, table, columns)
            _check_values(db, path, table, columns)
    if "cells" in tables:
        _check_bits(db, path)
    if "stability" in tables:
        _check_stability(db, path)
    if "landscapes" in tables:
        _check_landscapes(db, path)


def _check_objects(db: sqlite3.Connection, path: Path) -> None:
    """The store holds only what the harness made: its tables and their unique indexes. A
    trigger can rewrite every row as it is recorded and a view or another table is read by
    no one honest; either is named in one line and the store refused."""
    foreign = [
        f"{kind} {name!r}"
        for kind, name in execute(db, path, "SELECT type, name FROM sqlite_master")
        if not (
            kind == "table"
            and name in TABLE_COLUMNS
            or kind == "index"
            and name.startswith("sqlite_autoindex_")
        )
    ]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(
            f"{path} holds {shown}, which this harness never makes (planted?): nothing was read or written; "
            "restore the store, or move it aside and run again to recompute it"
        )


def _check_bits(db: sqlite3.Connection, path: Path) -> None:
    """Each cell's bits count its `correct` examples, and nothing past its `n`: the worst
    case and the ensembles read the bits, the tables read `accuracy`, so the two must agree."""
    rows = execute(db, path, "SELECT rowid, n, correct, correct_bits FROM cells")
    for rowid, n, correct, bits in rows:
        unpacked = np.unpackbits(np.frombuffer(bits, dtype=np.uint8))
        if int(unpacked[:n].sum()) != correct or unpacked[n:].any():
            raise UserError(
                f"{path.name} has a damaged row: cells row {rowid} ({_cell_named(db, path, rowid)}) holds correct_bits "
                f"with {int(unpacked.sum())} correct examples, not correct = {correct} (edited by hand?); nothing was "
                f'read or written: restore the store, or delete that row (sqlite3 {path} "DELETE FROM cells WHERE '
                f'rowid = {rowid}") and run again to recompute it'
            )


def _check_stability(db: sqlite3.Connection, path: Path) -> None:
    """Each stability row's per-image values are of its quantity (in its range: norms and
    growth are never negative), and its stored mean and median are theirs, as the stage
    computes them (float32, NULL when not finite): the figures and tables read the
    per-image values, the claims the means, so the two must agree."""
    rows = execute(db, path, "SELECT rowid, quantity, block, mean, median, per_image FROM stability")
    for rowid, quantity, block, mean, median, packed in rows:
        values = np.frombuffer(packed, dtype="<f4")
        if quantity not in STABILITY_FLOORS:
            problem = f"quantity = {quantity!r}, not one of {', '.join(STABILITY_FLOORS)}"
        elif STABILITY_FLOORS[quantity] is not None and (values < STABILITY_FLOORS[quantity]).any():
            problem = f"a per-image {quantity} of {float(values.min()):g}, below its least possible {STABILITY_FLOORS[quantity]:g}"
        else:
            problem = next(
                (
                    f"{name} = {stored!r}, not {expected!r} (the {name} of its per-image values)"
                    for name, stored, expected in (
                        ("mean", mean, _finite(np.mean(values))),
                        ("median", median, _finite(np.median(values))),
                    )
                    if not _same(stored, expected)
                ),
                "",
            )
        if problem:
            run, dataset, seed, digest = execute(
                db,
                path,
                "SELECT run, dataset, seed, checkpoint_sha256 FROM stability WHERE rowid = ?",
                [rowid],
            )[0]
            unit = f"run = '{run}' AND dataset = '{dataset}' AND seed = {seed} AND quantity = '{quantity}'"
            raise UserError(
                f"{path.name} has a damaged row: stability row {rowid} ({run} {dataset} seed {seed}, block {block}) holds "
                f"{problem} (edited by hand?); nothing was read or written: restore the store, or delete that unit "
                f"(sqlite3 {path} \"DELETE FROM stability WHERE {unit} AND checkpoint_sha256 = '{digest}'\") and "
                "run again to measure it"
            )


def _check_landscapes(db: sqlite3.Connection, path: Path) -> None:
    """Each landscape's grids hold what they can: cross-entropy losses (finite, never
    negative) and class indices (never negative)."""
    for rowid, run, dataset, seed, loss, classes in execute(
        db, path, "SELECT rowid, run, dataset, seed, loss, classes FROM landscapes"
    ):
        losses, labels = np.frombuffer(loss, dtype="<f4"), np.frombuffer(classes, dtype="<i2")
        problem = (
            "a loss that is negative or not finite"
            if not (np.isfinite(losses).all() and (losses >= 0).all())
            else "a negative class"
            if (labels < 0).any()
            else ""
        )
        if problem:
            raise UserError(
                f"{path.name} has a damaged row: landscapes row {rowid} ({run} {dataset} seed {seed}) holds {problem} "
                f"(edited by hand?); nothing was read or written: restore the store, or delete that row (sqlite3 {path} "
                f'"DELETE FROM landscapes WHERE rowid = {rowid}") and run again to measure it'
            )


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def _same(stored: object, expected: float | None) -> bool:
    """A stored figure equals the one recomputed (to float32's rounding of the sum)."""
    if expected is None or stored is None:
        return stored is expected
    return isinstance(stored, int | float) and abs(stored - expected) <= 1e-6 * max(1.0, abs(expected))


def _cell_named(db: sqlite3.Connection, path: Path, rowid: int) -> str:
    """A cell as a reader knows it: run, data set, seed, perturbation and radius or severity."""
    run, dataset, seed, kind, eps, severity = execute(
        db,
        path,
        "SELECT run, dataset, seed, perturbation, eps_255, severity FROM cells WHERE rowid = ?",
        [rowid],
    )[0]
    where = (
        f" severity {severity}"
        if severity
        else f" at {eps:g}/255"
        if isinstance(eps, int | float) and eps
        else ""
    )
    return f"{run} {dataset} seed {seed}, {kind}{where}"


# The text columns that reach tables, the leaderboard and REPORT.md as they are: each holds a
# name of the characters run names may have (bench.eval.identity.NAME), so that no row can
# add a row of its own to a Markdown table or a line to a report.
NAME_COLUMNS = (
    "run",
    "model",
    "family",
    "dataset",
    "data_source",
    "perturbation",
    "preset",
    "quantity",
    "check",
)
NAME_RULE = (
    "length({0}) BETWEEN 1 AND 200 AND {0} NOT GLOB '*[^A-Za-z0-9._@+-]*' "
    "AND substr({0}, 1, 1) GLOB '[A-Za-z0-9]'"
)
NAME_MEANING = "of 1-200 letters, digits and . _ @ + - (the characters --name takes)"


def _value_rules(table: str, columns: dict[str, str]) -> dict[str, tuple[str, str]]:
    """column -> (SQL condition every row meets, what it means): each value of its SQL
    type (NULL only where a column allows it), and counts and shares in their ranges."""
    typeof = {"TEXT": "('text')", "INTEGER": "('integer')", "REAL": "('real', 'integer')"}
    words = {"TEXT": "a string", "INTEGER": "an integer", "REAL": "a number"}
    ranges = {
        "n": ("{0} >= 1", "at least 1"),
        "members": ("{0} >= 1", "at least 1"),
        "block": ("{0} >= -1", "at least -1"),
        "damped": ("{0} IN (0, 1)", "0 or 1"),
        "severity": ("{0} BETWEEN 0 AND 5", "in 0-5"),
        "eps_255": (f"{{0}} BETWEEN 0 AND {RADIUS_LIMIT_255:g}", f"in [0, {RADIUS_LIMIT_255:g}]"),
        "accuracy": (
            "{0} BETWEEN 0 AND 1 AND abs({0} * n - correct) < 1e-6",
            "in [0, 1] and equal to correct / n",
        ),
        "correct": ("{0} BETWEEN 0 AND n", "in [0, n]"),
        "test_accuracy": ("{0} BETWEEN 0 AND 1", "in [0, 1]"),
        "data_sha256": ("length({0}) = 64 AND {0} NOT GLOB '*[^0-9a-f]*'", "of 64 hex digits"),
        "points": ("{0} >= 2", "at least 2"),
        "right": ("{0} IN (0, 1)", "0 or 1"),
        "label": ("{0} >= 0", "at least 0"),
        "image_row": ("{0} >= 0", "at least 0"),
        **dict.fromkeys(NAME_COLUMNS, (NAME_RULE, NAME_MEANING)),
    }
    if table == "stability":  # a unit without a perturbation (spectral norms, input gradients)
        ranges["perturbation"] = (f"({{0}} = '' OR {NAME_RULE})", f"empty or {NAME_MEANING}")
    rules = {}
    for name, kind in columns.items():
        condition, meaning = ranges.get(name, ("1", ""))
        rule, what = (
            f"(typeof({{0}}) IN {typeof[kind]} AND ({condition}))",
            f"{words[kind]} {meaning}".strip(),
        )
        if name in NULLABLE:
            rule, what = f"({rule} OR typeof({{0}}) = 'null')", f"{what} or NULL"
        rules[name] = (rule, what)
    if table == "cells":
        rules["correct_bits"] = ("(typeof({0}) = 'blob' AND length({0}) = (n + 7) / 8)", "n bits, packed")
    if table == "stability":
        rules["per_image"] = ("(typeof({0}) = 'blob' AND length({0}) = 4 * n)", "n float32 values")
    if table == "landscapes":
        rules["loss"] = (
            "(typeof({0}) = 'blob' AND length({0}) = 4 * points * points)",
            "points x points float32 values",
        )
        rules["classes"] = (
            "(typeof({0}) = 'blob' AND length({0}) = 2 * points * points)",
            "points x points int16 values",
        )
    return rules


def _check_columns(db: sqlite3.Connection, path: Path, table: str, columns: dict[str, str]) -> None:
    """A table of ours with columns of its own (another tool's `cells`): not a store of
    this project. Columns that `migrate` adds (and the ones it replaces) may be missing."""
    present = set(table_columns(db, path, table))
    missing = [c for c in columns if c not in present]
    # ours, of an earlier layout: no migration before a release
    if missing and {"run", "checkpoint_sha256"} <= present:
        raise UserError(
            f"{path} was written by an earlier version of inres-bench (its {table} table lacks {missing[0]}): "
            "run again with a new --results-dir; the old store is left as it is"
        )
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(
            corrupt_message(path, f"its {table} table lacks the columns {shown}: not a store of this project")
        )


def _check_values(db: sqlite3.Connection, path: Path, table: str, columns: dict[str, str]) -> None:
    present = {row[1] for row in execute(db, path, f"PRAGMA table_info({table})")}
    rules = {c: r for c, r in _value_rules(table, columns).items() if c in present}
    cases = " ".join(
        f"WHEN NOT {rule.format(quoted(c))} THEN {i}" for i, (c, (rule, _)) in enumerate(rules.items())
    )
    sql = f"SELECT rowid, bad FROM (SELECT rowid, CASE {cases} END AS bad FROM {table}) WHERE bad IS NOT NULL LIMIT 1"
    found = execute(db, path, sql)
    if found:
        rowid, index = found[0]
        column, (_, meaning) = list(rules.items())[index]
        (value,) = execute(db, path, f"SELECT {quoted(column)} FROM {table} WHERE rowid = ?", [rowid])[0]
        shown = (
            f"{len(value)} bytes" if isinstance(value, bytes) else "NULL" if value is None else repr(value)
        )
        named = f" ({_cell_named(db, path, rowid)})" if table == "cells" and column not in _NAMING else ""
        raise UserError(
            f"{path.name} has a damaged row: {table} row {rowid}{named} holds {column} = {shown}, not {meaning} (edited "
            f"by hand?); nothing was read or written: restore the store, or delete that row "
            f'(sqlite3 {path} "DELETE FROM {table} WHERE rowid = {rowid}") and run again to recompute it'
        )


# a cell's name: shown only when valid
_NAMING = ("run", "dataset", "seed", "perturbation", "eps_255", "severity")
