"""The one exception type for mistakes a user can fix (bad name, bad file, bad option).

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """An expected mistake: the message says what is wrong, where, and how to fix it."""


class FieldError(UserError):
    """A config field's value refused. It keeps the parts, so that the command line can name
    the option it came from in place of the field (run_bench.OPTION_OF_FIELD)."""

    def __init__(self, owner: str, field: str, shown: str, problem: str):
        self.field, self.shown, self.problem = field, shown, problem
        super().__init__(f"{owner}.{field} {shown}: {problem}")

    def naming(self, option: str) -> str:
        """The same message, naming `option` (e.g. --radii) where it names the field."""
        return f"{option} {self.shown}: {self.problem}"
