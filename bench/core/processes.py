"""Processes sharing a results dir: run locks (so that none repeats another's work), and
the removal of what a killed process left (temporary files tagged with its host and pid,
removed only when that process is provably gone)."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from bench.core.files import TEMP_TAG, check_file_target, check_not_link
from models import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
LOCKS = ".locks"  # the folder of a results dir that holds its runs' lock files


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, blocking: bool = True) -> Iterator[bool]:
    """An exclusive lock on `path` (created if needed) for the `with` block; yields whether
    it is held (always, when `blocking`). Processes sharing a results dir take it around a
    run's training or evaluation, so that none repeats another's work. Held locks vanish
    with their process, so a killed run never leaves one behind."""
    path = Path(path)
    check_file_target(path)
    check_not_link(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a+b")  # noqa: SIM115 (closed below, after the lock is released)
    except OSError as err:
        raise UserError(
            f"cannot take the lock {path} ({err.strerror}): make {path.parent} a writable folder "
            "or choose another --results-dir"
        ) from None
    with handle:
        if fcntl is None:  # no flock (Windows): no sharing of a results dir between processes
            yield True
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_orphans(root: str | os.PathLike, under: tuple[str, ...] = ()) -> int:
    """Delete the temporary files and folders that a killed run of this project left
    directly in `root` or anywhere below its subfolders `under` (the folders the harness
    writes); returns how many. Only names carrying our tag (`.<name>.inres-<host>-<pid>-…`)
    whose writer is provably gone from this host are removed: a live writer's, another
    host's, and any other tool's files (a `.draft.abcdefgh.tmp` of the user's) are left."""
    top, removed, host = Path(root), 0, socket.gethostname().split(".")[0]
    if not top.is_dir():
        return 0
    places = [(top, [p.name for p in _entries(top)])]
    for sub in under:
        for walked, dirs, files in os.walk(top / sub):
            places.append((Path(walked), [*dirs, *files]))
    for folder, names in places:
        for name in names:
            tagged = TEMP_TAG.match(name)
            if not tagged or tagged["host"] != host or _alive(int(tagged["pid"])):
                continue
            path = folder / name
            try:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                removed += 1
            except OSError:  # a read-only data dir: leave it
                pass
    if removed:
        log.info("removed %d temporary file(s) left under %s by killed runs", removed, top)
    return removed


def _entries(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
