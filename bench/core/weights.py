"""State-dict files: saved atomically, and read as the untrusted input they are: only
ever with `weights_only=True`, and a file that is missing, truncated, not a state_dict, or
that does not fit the model fails with one `UserError` line naming the file and the
mismatch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.core.files import atomic_write, sha256_file
from bench.core.messages import reason
from models import UserError

_SHOWN = 4  # keys listed per kind of mismatch before "+N more"


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike) -> str:
    """Atomically save `state` (tensors only); returns the file's sha256."""
    atomic_write(path, lambda f: torch.save(dict(state), f))
    return sha256_file(path)


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
