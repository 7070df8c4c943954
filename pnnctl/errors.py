"""Errors a user can fix. The CLI turns them into one line on stderr and exit code 2."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input: a config field, a flag, a data file or a results folder.

    The message is one line that names the field (or file) and says what is allowed.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")
