"""Exceptions of the data pipeline. All are :class:`mks2.errors.UserError` (and ``ValueError``)
subclasses: they report user errors (bad input files, mismatched tokenizers, corrupted shards),
never internal bugs."""

from __future__ import annotations

from mks2.errors import UserError


class DataError(UserError, ValueError):
    """Base class of user-facing data errors."""


class BadRecord(DataError):
    """One input record cannot be used. ``where`` is ``file:line`` (``file:row N`` for Parquet)."""

    def __init__(self, where: str, reason: str):
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keep (where, reason) when raised in a worker process
        return (BadRecord, (self.where, self.reason))


class PretokenizeError(DataError):
    """A pretokenize run cannot start or continue (bad arguments, existing output, failed record)."""


class DatasetError(DataError):
    """A pretokenized dataset directory is missing, incomplete, corrupted or does not match the run."""
