"""The one base class of user errors.

Every exception that means "fix your config, data, checkpoint or command line" derives from
:class:`UserError` (each area keeps its own subclass next to its code: ``ConfigError`` in
``mks2.config``, ``CheckpointError`` in ``mks2.checkpoint``, ``DataError`` in ``mks2.data.errors``, ...).
Entry scripts catch ``UserError`` and print its message in one line, without a traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(Exception):
    """A problem the user can fix; the message names the key, file, line or step and what to do."""


def name_mismatch(
    missing: Iterable[str],
    unexpected: Iterable[str],
    *,
    missing_as: str = "missing {n} tensor(s)",
    unexpected_as: str = "unexpected {n} tensor(s)",
) -> str:
    """Indented lines for an error about tensor names that do not match: ``  - missing 3 tensor(s): a, b, c``
    (``{n}`` in a label is the count). Each list is sorted and cut at 8 names, so a wholesale mismatch
    stays readable."""
    lines = []
    for label, names in ((missing_as, sorted(missing)), (unexpected_as, sorted(unexpected))):
        if names:
            shown = ", ".join(names[:8]) + (f" ... (+{len(names) - 8} more)" if len(names) > 8 else "")
            lines.append(f"  - {label.format(n=len(names))}: {shown}")
    return "\n".join(lines)
