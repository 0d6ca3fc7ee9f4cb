"""Shared helpers of the entry scripts in ``launch/``: logging set-up and user-error reporting."""

from __future__ import annotations

import logging
import os
import sys

from mks2.errors import UserError

USER_ERRORS: tuple[type[BaseException], ...] = (UserError,)
"""Exceptions that mean "fix your config / data / checkpoint", reported without a traceback: the one
base class every area's user error derives from (``ConfigError``, ``DataError``, ``CheckpointError``,
``HFCheckpointError``, ``TrainingAborted``, ...)."""


def env_rank() -> int:
    """Global rank from whichever launcher started us (before torch.distributed exists)."""
    for var in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def setup_logging() -> None:
    """INFO on rank 0, warnings only elsewhere; DeepSpeed's own logger is kept at warning level."""
    level = logging.INFO if env_rank() == 0 else logging.WARNING
    logging.basicConfig(level=level, format="[%(asctime)s] [rank %(rank)s] %(message)s", datefmt="%H:%M:%S")
    old = logging.getLogRecordFactory()
    rank = env_rank()

    def factory(*args, **kwargs):
        record = old(*args, **kwargs)
        record.rank = rank
        return record

    logging.setLogRecordFactory(factory)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def report_error(exc: BaseException) -> None:
    """Print a user error once per distinct rank output: every rank prints (a rank-specific problem
    must not be hidden), prefixed with its rank."""
    print(f"[rank {env_rank()}] error: {exc}", file=sys.stderr, flush=True)
