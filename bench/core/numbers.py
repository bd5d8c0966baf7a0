"""Numbers as a user writes them (command-line options, TOML strings), read exactly: only
ASCII decimals. Python's own `float` and `int` read other scripts' digits ('٢' is 2) and
round a nonzero number below the smallest float to 0 (1e-400), so an option would run a
value its user never wrote."""

from __future__ import annotations

import re

_DECIMAL = re.compile(
    r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|infinity|nan)", re.ASCII | re.IGNORECASE
)
_INTEGER = re.compile(r"[+-]?\d+", re.ASCII)


def decimal(text: str) -> float:
    """`text` as a float; ValueError, saying why, when it is not an ASCII decimal or is a
    nonzero number that a float holds as 0."""
    text = text.strip()
    if not _DECIMAL.fullmatch(text):
        raise ValueError(f"{text!r} is not a decimal number (ASCII digits, e.g. 2 or 0.5)")
    value = float(text)
    if value == 0 and re.search(r"[1-9]", re.split(r"[eE]", text)[0]):
        raise ValueError(f"{text} is nonzero but below the smallest float (it would be read as 0)")
    return value


def integer(text: str) -> int:
    """`text` as an int; ValueError when it is not ASCII digits (with an optional sign)."""
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        raise ValueError(f"{text!r} is not an integer (ASCII digits, e.g. 100)")
    return int(text)


SEED_LIMIT = 2**32  # seeds are 32-bit: every generator and the records take them as they are
