"""``ConfigError``: every problem of a run configuration, reported in one message."""

from __future__ import annotations

from collections.abc import Sequence

from mks2.errors import UserError


class ConfigError(UserError, ValueError):
    """A run configuration is invalid. The message lists every problem found, one per line.

    A ``ValueError`` too, so callers that predate ``UserError`` keep catching it."""

    def __init__(self, problems: Sequence[str], source: str = "config"):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in {source}:\n{lines}")
