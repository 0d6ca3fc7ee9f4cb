"""The one base class of user errors.

Every exception that means "fix your config, data, checkpoint or command line" derives from
:class:`UserError` (each area keeps its own subclass next to its code: ``ConfigError`` in
``mks2.config``, ``CheckpointError`` in ``mks2.checkpoint``, ``DataError`` in ``mks2.data.errors``, ...).
Entry scripts catch ``UserError`` and print its message in one line, without a traceback; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the key, file, line or step and what to do."""
