"""How library and system errors become the harness's one-line messages: a library
error as a short phrase, and a full disk (or quota) found anywhere in an error's chain,
worded with the options that move the work elsewhere."""

from __future__ import annotations

import errno
import re
import sqlite3

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def reason(err: BaseException, limit: int = 200) -> str:
    """A library error as a short phrase for our one-line messages: the first sentence of
    its most specific line (torch's weights-only failures bury it under advice), whole
    words only, never empty."""
    text = _ANSI.sub("", str(err)).strip()
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1].strip()
    text = " ".join(text.splitlines()[0].split()) if text else ""
    if not text:
        return {"EOFError": "empty or truncated file"}.get(type(err).__name__, type(err).__name__)
    text = text.split(". ", 1)[0]
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text.rstrip(".")


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def disk_full(err: BaseException | None) -> BaseException | None:
    """The error in `err`'s chain that says a disk (or quota, or file size limit) is full,
    if any: libraries such as torch re-raise it as their own error."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in DISK_FULL:
            return err
        if isinstance(err, sqlite3.OperationalError) and "full" in str(err):
            return err
        err = err.__cause__ or err.__context__
    return None


def disk_full_message(err: BaseException, where: str) -> str:
    return (
        f"no space left {where} ({getattr(err, 'strerror', None) or err}): free space there or choose "
        "another --results-dir / --data-dir; finished work is kept"
    )
