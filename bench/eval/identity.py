"""What names and identifies a defense in the records: its name (the characters --name
takes, never a registered model's), and its build (what besides the
weights made the network, as canonical JSON, the source files of its code included)."""

from __future__ import annotations

import hashlib
import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from models import UserError, list_models

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,99}")  # a defense's name is a folder and a file name


def check_name(name: object, where: str) -> str:
    """A defense's name, which names its records, locks and leaderboard files: not a
    registered model's (its rows would read as the zoo's)."""
    # the command line's words, or the API's
    option = "--name" if where.startswith(("--", "defense ")) else "name="
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(
            f"{where}: defense name {name!r} must be 1-100 letters, digits or . _ @ + - (starting with a letter or "
            f"digit): give another with {option}"
        )
    if name.split("@")[0] in list_models():  # a zoo run's tag is its model's name and its options
        raise UserError(
            f"{where}: defense name {name!r} reads as a registered model's run: give it another with {option}"
        )
    return name


def check_run_name(name: object, where: str, zoo: bool) -> str:
    """A run's name as the records take it: a checkpoint of the zoo keeps its run tag (the
    characters alone are checked), any other defense follows `check_name`."""
    if not zoo:
        return check_name(name, where)
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise UserError(f"{where}: run name {name!r} must be 1-100 letters, digits or . _ @ + -")
    return name


def build_text(build: dict) -> str:
    """DefenseInfo.build: canonical JSON."""
    return json.dumps(build, sort_keys=True, separators=(",", ":"))


def code_digest(factory: Callable, net: nn.Module) -> str:
    """sha256 of the source files that define the factory and every module class of `net`
    outside torch: another file with the same names is another build, never served the
    first one's numbers. '' when no source file is known (code typed at a prompt)."""
    files = {_source_file(inspect.unwrap(factory))}
    files |= {_source_file(type(m)) for m in net.modules() if not type(m).__module__.startswith("torch.")}
    found = sorted(f for f in files if f)
    if not found:
        return ""
    digest = hashlib.sha256()
    for name in found:
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()


def _source_file(obj: Any) -> str:
    try:
        name = inspect.getsourcefile(obj)
    except (TypeError, OSError):
        return ""
    return name if name and Path(name).is_file() else ""
