"""Safe, checked loading and atomic saving of state_dict files.

Checkpoints are untrusted input: they are only ever read with `weights_only=True`, and a
file that is missing, truncated, not a state_dict, or that does not fit the model fails
with one `UserError` line naming the file and the mismatch.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserError

_SHOWN = 4  # keys listed per kind of mismatch before "+N more"


def sha256_file(path: str | os.PathLike) -> str:
    return file_digest(path, "sha256")


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def atomic_write(path: str | os.PathLike, write: Any) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then rename it over
    `path`: readers see the old file or the whole new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike) -> str:
    """Atomically save `state` (tensors only); returns the file's sha256."""
    atomic_write(path, lambda f: torch.save(dict(state), f))
    return sha256_file(path)


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
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(
            f"checkpoint {path} cannot be read with weights_only=True ({reason[:160]}); "
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
        f"{label} {_listing(items)}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatch", shapes),
        )
        if items
    ]
    return "; ".join(parts)


def _listing(items: list[str]) -> str:
    more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more
