"""The harness's file I/O, used by every layer: atomic writes (text, bytes, JSON), checks
that a path can be written before any work, and digests. Temporary files carry their
writer's host and pid (`temp_prefix`), so that bench.core.processes can tell the orphans of
a killed process from the files of a live one."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.core.messages import disk_full, disk_full_message
from models import UserError

# Temporary files and folders carry their writer's host and pid, so that a later run can
# tell the orphans of a killed process from the files another live process is writing.
TEMP_TAG = re.compile(r"^\..*\.inres-(?P<host>[\w-]+)-(?P<pid>\d+)-[^/]*$")


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def temp_prefix(name: str) -> str:
    """The name prefix of this process's temporary files and folders for `name`."""
    return f".{name}.inres-{socket.gethostname().split('.')[0]}-{os.getpid()}-"


def file_mode() -> int:
    """Permissions of a new file under the process umask (mkstemp alone gives 0600, but
    results are meant to be shared like any file the user writes)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call `write(file_object)` on a temporary file beside `path` (or write `write`
    itself, text as UTF-8 or bytes), then rename it over `path`: readers see the old file
    or the whole new one, never a partial one."""
    if isinstance(write, str | bytes):
        data = write.encode() if isinstance(write, str) else write
        write = lambda f: f.write(data)  # noqa: E731
    path = Path(path)
    check_file_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix(path.name), suffix=".tmp")
    except OSError as err:
        raise UserError(_cannot_write(path, err)) from None
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):  # a folder or a read-only file in the way, a full disk
            raise UserError(_cannot_write(path, err)) from None
        full = disk_full(err)
        if full is not None:
            raise UserError(disk_full_message(full, f"to write {path}")) from None
        raise


def check_file_target(path: str | os.PathLike) -> None:
    """One error line when `path` cannot become a file: a folder stands in its place, or
    one of its parents is a file."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"cannot write {path}: a folder of that name is in its place; move it aside and run again"
        )
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is a file, not a folder; move it aside and run again")


def check_not_link(path: str | os.PathLike) -> None:
    """One error line when `path`, about to be opened for appending, locking or as a
    database, is a symbolic link: opening it would write wherever the link points (an
    atomic write replaces a link instead, and needs no check)."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(
            f"{path} is a symbolic link (to {os.readlink(path)}): the harness never writes through a "
            "link it did not make; remove the link and run again"
        )


def check_no_links(root: str | os.PathLike, folders: tuple[str, ...], names: tuple[str, ...] = ()) -> None:
    """One error line for a symbolic link under `root`'s `folders` (or at its top-level
    `names`) that points outside `root`: what the harness writes there stays there. A
    link within `root` is harmless; `root` itself may be a link."""
    root = Path(root)
    if not root.is_dir():
        return
    inside = root.resolve()
    found = [root / n for n in names if (root / n).is_symlink()]
    for sub in folders:
        top = root / sub
        found += [top] if top.is_symlink() else []
        for folder, dirs, files in os.walk(top):  # links to folders are listed, never followed
            found += [Path(folder) / n for n in (*dirs, *files) if (Path(folder) / n).is_symlink()]
    for link in found:
        if not link.resolve().is_relative_to(inside):
            raise UserError(
                f"{link} is a symbolic link to {os.readlink(link)}, outside {root}: the harness never "
                "writes through a link it did not make; replace it with a folder or file of its own"
            )


def _cannot_write(path: Path, err: OSError) -> str:
    if disk_full(err) is not None:
        return disk_full_message(err, f"to write {path}")
    if _refuses_folders(path.parent, err):
        return f"cannot write {path} ({_why(path.parent, err)}): choose another --results-dir / --data-dir"
    return (
        f"cannot write {path} ({err.strerror or type(err).__name__}): make {path.parent} writable or choose "
        "another --results-dir / --data-dir"
    )


def _refuses_folders(folder: Path, err: OSError) -> bool:
    """Whether `folder` could not be made although its nearest existing parent is a folder
    (/proc, /sys, a FUSE mount): "no such file" would read as if it had to exist first."""
    return err.errno == errno.ENOENT and not folder.exists()


def _why(folder: Path, err: OSError) -> str:
    if _refuses_folders(folder, err):
        parent = next((p for p in folder.parents if p.exists()), None)
        return f"{parent} takes no new folders: {err.strerror}"
    return err.strerror or type(err).__name__


def check_writable(folder: str | os.PathLike, what: str, option: str, create: bool = True) -> Path:
    """Prove that `folder` takes new files (a read-only mount or a folder of another user's
    does not): one error line naming `option` otherwise. With `create`, `folder` is made
    if needed; without, nothing is made: a missing folder's nearest existing parent is
    probed instead (a read-only results dir is refused before the data checks write
    generated files, and a refused run leaves no empty folder)."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(
            f"cannot write {what} to {folder}: {blocker} is a file, not a folder; move it aside or choose another {option}"
        )
    probed = folder if create else next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=probed, prefix=temp_prefix("probe"), suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if disk_full(err) is not None:
            raise UserError(disk_full_message(err, f"to write {what} to {folder}")) from None
        raise UserError(
            f"cannot write {what} to {folder} ({_why(folder, err)}): choose another {option}"
        ) from None
    return folder


def write_all(texts: Mapping[Path, str | bytes]) -> list[Path]:
    """Write each file atomically, after checking that every path can become a file: a
    folder in the way of the last one is refused before the first is written."""
    for path in texts:
        check_file_target(path)
    for path, content in texts.items():
        atomic_write(path, content)
    return [Path(path) for path in texts]


def save_json(obj: Any, path: str | os.PathLike) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
