"""Errors the CLI turns into one line on stderr: a user's mistake (exit 2) or a failed rank (exit 1)."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input: a config field, a flag, a data file or a results folder.

    The message is one line that names the field (or file) and says what is allowed.
    """

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}")


class RankFailed(RuntimeError):
    """A rank of a ``--nproc`` run died, hung past the timeout, or raised; the message says how to resume."""


class GridInterrupted(KeyboardInterrupt):
    """A compare cell stopped for a signal (``signal_name``: SIGINT or SIGTERM); the grid stops with it."""

    def __init__(self, signal_name: str) -> None:
        self.signal_name = signal_name
        super().__init__(signal_name)
