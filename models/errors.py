"""The one exception type for mistakes a user can fix (bad name, bad file, bad option).

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected mistake: the message says what is wrong, where, and how to fix it."""
