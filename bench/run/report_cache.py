"""Whether the reports already written are those the records would give now.

A report is a function of the records, the checkpoints' files (Fig. 1's coefficients,
Fig. 2's forwards), the data files (Fig. 2's images), the options that shape it and the
code. Their digest is kept in `results/.reports.json` beside the size and modification
time of every file the report wrote; a run whose digest is unchanged and whose files are
all as written rewrites nothing (a cached rerun does no work), and any change to any of
them, or a file of the report edited or removed, writes the report again.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import models
from bench.core.files import atomic_write
from bench.records.store import content_digest

MANIFEST = ".reports.json"
_CODE_FILES = ("*.py", "*.csv")  # the code and the published numbers it compares with


def inputs_digest(results_dir: str | os.PathLike, kind: str, options: dict) -> str:
    """The digest of everything a report of `kind` ("report", "figures", "sanity") with
    `options` (JSON-able) is computed from."""
    results = Path(results_dir)
    digest = hashlib.sha256(
        json.dumps({"kind": kind, "options": options}, sort_keys=True, default=str).encode()
    )
    digest.update(content_digest(results).encode())
    digest.update(repr(_stats(results / "checkpoints", results)).encode())
    for root in (Path(__file__).resolve().parents[1], Path(models.__file__).parent):  # bench/, models/
        for pattern in _CODE_FILES:
            for path in sorted(root.rglob(pattern)):
                digest.update(
                    path.relative_to(root).as_posix().encode() + hashlib.sha256(path.read_bytes()).digest()
                )
    return digest.hexdigest()


def up_to_date(results_dir: str | os.PathLike, kind: str, digest: str) -> bool:
    """Whether the last report of `kind` was made from inputs of this digest and each of
    its files is still as it was written."""
    entry = _manifest(Path(results_dir)).get(kind)
    if (
        not isinstance(entry, dict)
        or entry.get("inputs") != digest
        or not isinstance(entry.get("files"), dict)
    ):
        return False
    results = Path(results_dir)
    return all(_stat(results / name) == stat for name, stat in entry["files"].items())


def remember(results_dir: str | os.PathLike, kind: str, digest: str, written: list[Path]) -> None:
    """Record that `written` is the report of `kind` made from inputs of `digest`."""
    results = Path(results_dir)
    manifest = _manifest(results)
    manifest[kind] = {
        "inputs": digest,
        "files": {p.relative_to(results).as_posix(): _stat(p) for p in written},
    }
    atomic_write(results / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _manifest(results: Path) -> dict:
    try:
        found = json.loads((results / MANIFEST).read_text())
    except (OSError, ValueError):  # none yet, or damaged: every report is written again
        return {}
    return found if isinstance(found, dict) else {}


def _stat(path: Path) -> list[int] | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return [found.st_size, found.st_mtime_ns]


def _stats(folder: Path, base: Path) -> list[tuple[str, list[int] | None]]:
    """(path, [size, mtime]) of every file below `folder`, in order; a file replaced or
    touched since changes it."""
    if not folder.is_dir():
        return []
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = Path(root) / name
            found.append((path.relative_to(base).as_posix(), _stat(path)))
    return found
