"""The harness's file I/O, used by every layer: atomic writes (text, bytes, JSON, state
dicts), write checks before work, run locks, the orphans of killed processes, digests, and
safe, checked loading of state_dict files.

Checkpoints are untrusted input: they are only ever read with `weights_only=True`, and a
file that is missing, truncated, not a state_dict, or that does not fit the model fails
with one `UserError` line naming the file and the mismatch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from models.errors import UserError, disk_full, disk_full_message, reason

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

log = logging.getLogger(__name__)
_SHOWN = 4  # keys listed per kind of mismatch before "+N more"
# Temporary files and folders carry their writer's host and pid, so that a later run can
# tell the orphans of a killed process from the files another live process is writing.
_TEMP_TAG = re.compile(r"^\..*\.inres-(?P<host>[\w-]+)-(?P<pid>\d+)-[^/]*$")
LOCKS = ".locks"  # the folder of a results dir that holds its runs' lock files


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
        raise UserError(f"cannot write {path}: a folder of that name is in its place; move it aside and run again")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"cannot write {path}: {parent} is a file, not a folder; move it aside and run again")


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


def check_writable(folder: str | os.PathLike, what: str, option: str) -> Path:
    """Create `folder` if needed and prove it takes new files (a read-only mount or a
    folder of another user's does not): one error line naming `option` otherwise."""
    folder = Path(folder)
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise UserError(f"cannot write {what} to {folder}: {blocker} is a file, not a folder; move it aside or choose another {option}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=temp_prefix("probe"), suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        if disk_full(err) is not None:
            raise UserError(disk_full_message(err, f"to write {what} to {folder}")) from None
        raise UserError(f"cannot write {what} to {folder} ({_why(folder, err)}): choose another {option}") from None
    return folder


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, blocking: bool = True):
    """An exclusive lock on `path` (created if needed) for the `with` block; yields whether
    it is held (always, when `blocking`). Processes sharing a results dir take it around a
    run's training or evaluation, so that none repeats another's work. Held locks vanish
    with their process, so a killed run never leaves one behind."""
    path = Path(path)
    check_file_target(path)
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
    root, removed, host = Path(root), 0, socket.gethostname().split(".")[0]
    if not root.is_dir():
        return 0
    places = [(root, [p.name for p in _entries(root)])]
    for sub in under:
        for folder, dirs, files in os.walk(root / sub):
            places.append((Path(folder), [*dirs, *files]))
    for folder, names in places:
        for name in names:
            tagged = _TEMP_TAG.match(name)
            if not tagged or tagged["host"] != host or _alive(int(tagged["pid"])):
                continue
            path = folder / name
            try:
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                removed += 1
            except OSError:  # a read-only data dir: leave it
                pass
    if removed:
        log.info("removed %d temporary file(s) left under %s by killed runs", removed, root)
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


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike) -> str:
    """Atomically save `state` (tensors only); returns the file's sha256."""
    atomic_write(path, lambda f: torch.save(dict(state), f))
    return sha256_file(path)


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


def read_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a state_dict file with weights_only=True. Accepts a bare state_dict or one
    under a "state_dict" key, and strips a DataParallel "module." prefix."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found: check the path (cwd is {Path.cwd()})")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad file; all mean the same
        raise UserError(
            f"checkpoint {path} cannot be read with weights_only=True ({reason(err)}); "
            "it is truncated, not a torch.save file, or pickles code: re-save its state_dict"
        ) from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    ):
        raise UserError(
            f"checkpoint {path} holds a {type(obj).__name__}, not a state_dict of named "
            "tensors: save model.state_dict()"
        )
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_state_dict_file(model: nn.Module, path: str | os.PathLike) -> str:
    """Load `path` into `model` strictly; returns the file's sha256."""
    state = read_state_dict(path)
    mismatch = describe_mismatch(model.state_dict(), state)
    if mismatch:
        raise UserError(f"checkpoint {path} does not fit {type(model).__name__}: {mismatch}")
    model.load_state_dict(state, strict=True)
    return sha256_file(path)


def describe_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> str:
    """'' when keys and shapes agree, else a one-line summary of what differs."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k} file {tuple(found[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    parts = [
        f"{label} {listing(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", shapes),
        )
        if items
    ]
    return "; ".join(parts)


def listing(items: list[str]) -> str:
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more
