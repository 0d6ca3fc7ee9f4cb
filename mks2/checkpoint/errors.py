"""The one error class of checkpoints (finding, reading, resuming from, continuing from one)."""

from __future__ import annotations

from mks2.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be found or read as asked; the message names the directory, the config key
    or option that asked for it, and what to do. A ``ValueError`` too, as it was before the package
    had one base class of user errors (callers that collect ``ValueError`` problems keep working)."""


class PipelineLayoutError(CheckpointError):
    """A pipeline checkpoint's layer files do not match the trainer's pipeline layout (names the file
    and the key)."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (a full disk, a lost mount): names the file, the free space
    and the last complete checkpoint; the run stops on every rank."""
