"""The CIFAR python-batch format: reading, writing, downloading and extracting it.

The format alone, knowing no data set: `bench.data.datasets.load_split` loads every
registered data set stored this way (CIFAR-10, CIFAR-100, the synthetic set). Reads the
python archives with our own loader: no per-image PIL, and unlike torchvision's class it
also reads files that are not the official ones (test fixtures, the synthetic set),
reporting instead whether they are. Missing files are downloaded and md5-checked;
every file is written atomically, so a failed download or extraction leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.core.files import atomic_write, file_digest, file_mode, save_json, temp_prefix
from models import UserError

log = logging.getLogger(__name__)
DATA_DIR_ENV = "INRES_BENCH_DATA"


def default_data_dir() -> Path:
    """`$INRES_BENCH_DATA`, else ./data."""
    return Path(os.environ.get(DATA_DIR_ENV) or "data")


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The data dir to use (None: the default), refused in one line when it cannot be one."""
    if data_dir is not None and not str(data_dir).strip():
        raise UserError(f"--data-dir is empty: give a folder (default: ${DATA_DIR_ENV} or ./data)")
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if root.exists() and not root.is_dir():
        raise UserError(f"data dir {root} is a file, not a folder: choose another --data-dir")
    return root


@dataclass(frozen=True)
class ImageSet:
    """Images as uint8 (N, H, W, 3) NHWC and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    dataset: str
    official: bool  # every file has the official md5 (False for fixtures and synthetic)

    def __len__(self) -> int:
        return len(self.labels)


def read_batch(
    path: Path, label_key: str, num_classes: int, size: tuple[int, int] = (32, 32)
) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR python batch: pickle of {"data": uint8 (n, 3 H W) rows R..G..B, label_key:
    [..]}, images of `size` (H, W) pixels; returns uint8 (n, H, W, 3) and int64 (n,)."""
    row = 3 * size[0] * size[1]
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(f, encoding="latin1").load()
        if not isinstance(batch, dict):
            raise TypeError(f"it holds a {type(batch).__name__}, not a dict of 'data' and {label_key!r}")
        data, labels = batch["data"], np.asarray(batch[label_key])
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"{path} is not a readable CIFAR batch ({type(err).__name__}: {err}); delete it"
        ) from None
    if labels.dtype.kind not in "iu":  # floats would be truncated, huge ints overflow int64
        raise UserError(
            f"{path}: labels under {label_key!r} must be integers in [0, {num_classes}), "
            f"got {labels.dtype} values such as {labels.ravel()[:1].tolist()}"
        )
    if not (
        isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == row
    ):
        raise UserError(
            f"{path}: 'data' must be uint8 of shape (n, {row}), got {getattr(data, 'shape', data)}"
        )
    if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
        raise UserError(f"{path}: need {len(data)} labels in [0, {num_classes}), got shape {labels.shape}")
    images = data.reshape(-1, 3, *size).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


class _ArrayUnpickler(pickle.Unpickler):
    """Batches are untrusted pickles: allow only what a dict of numpy arrays needs."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5 arrays
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def download(url: str, dest: Path, md5: str | None, hint: str = "") -> None:
    """Stream `url` to `dest` through a temporary file, checking `md5` before the rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s to %s", url, dest)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=temp_prefix(dest.name), suffix=".part")
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if md5 is not None and digest.hexdigest() != md5:
            raise UserError(
                f"{url} arrived with md5 {digest.hexdigest()}, expected {md5}: nothing was kept; "
                f"try again, or put a verified {dest.name} in {dest.parent}"
            )
        os.chmod(tmp, file_mode())
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        reason = getattr(err, "reason", err)
        raise UserError(
            f"cannot download {url} ({reason}): put {dest.name}"
            + (f" (md5 {md5})" if md5 else "")
            + f" in {dest.parent}"
            + (f", {hint}" if hint else "")
        ) from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def extract_members(archive: Path, root: Path, folder: str, names: list[str]) -> None:
    """Extract `folder/name` for each name into root/folder: into a staging folder first,
    then each file renamed into place, so an interrupted run leaves no partial file."""
    wanted = {f"{folder}/{name}" for name in names}
    staging = Path(tempfile.mkdtemp(dir=root, prefix=temp_prefix("extract")))
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.name.removeprefix("./") in wanted]
            tar.extractall(staging, members=members, filter="data")
        missing = wanted - {m.name.removeprefix("./") for m in members}
        if missing:
            raise UserError(f"{archive} lacks {', '.join(sorted(missing))}: not the expected archive")
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            os.replace(staging / folder / name, root / folder / name)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise UserError(f"{archive} cannot be extracted ({err}); delete it and run again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: str = "labels") -> None:
    """Write uint8 (n, H, W, 3) images in the CIFAR python batch format, atomically."""
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    batch = {
        "batch_label": path.name,
        label_key: [int(y) for y in labels],
        "data": np.ascontiguousarray(rows, dtype=np.uint8),
        "filenames": [f"{i:05d}.png" for i in range(len(images))],
    }
    atomic_write(path, lambda f: pickle.dump(batch, f, protocol=2))


def md5_of(path: Path) -> str:
    return file_digest(path, "md5")


def verified_md5(path: Path, expected: str) -> bool:
    """Whether `path` has md5 `expected` (see `file_md5`)."""
    return file_md5(path) == expected


def file_md5(path: Path, remember: bool = True) -> str:
    """The md5 of `path`, computed once and kept in `<path>.md5.json` beside it, valid while
    the file's size and mtime stay (`remember=False`: nothing is written, as a dry run)."""
    stat, stamp = path.stat(), path.with_name(path.name + ".md5.json")
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    try:
        cached = json.loads(stamp.read_text())
        if {k: cached.get(k) for k in key} == key and isinstance(cached.get("md5"), str):
            return cached["md5"]
    except (OSError, ValueError, AttributeError):
        pass
    log.info("computing the md5 of %s (%.2f GB; once)", path, stat.st_size / 1e9)
    digest = md5_of(path)
    if remember:
        try:
            save_json({**key, "md5": digest}, stamp)
        except (OSError, UserError):  # a read-only data dir: computed again next time
            pass
    return digest
