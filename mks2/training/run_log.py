"""``<save_dir>/logs/``: what a run did, kept on disk so a failed job can be diagnosed after the fact.

- ``train.log``: rank 0's log (every ``mks2`` log line and progress message), appended across resumes,
  with a header at each start: time, host, command line, working directory, git commit, world size and
  package versions.
- ``error_rank<R>.log``: the fatal error of rank R (the traceback too when it is not a user error),
  appended, one block per failed start; every rank writes its own, so a rank-specific failure is kept.

Files get the mode a plain ``open()`` gives (0644 under the usual umask 022), folders 0755.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import platform
import shlex
import subprocess
import sys
import traceback
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

from mks2.errors import UserError
from mks2.training.cli import env_rank

LOG_DIR = "logs"
TRAIN_LOG = "train.log"
RUN_LOGGER = "mks2.run_log"  # lines for train.log only (the progress bar already showed them on screen)
_VERSIONED = ("torch", "deepspeed", "transformers", "mks2")


def env_world_size() -> int:
    """World size from whichever launcher started us (before torch.distributed exists)."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def git_commit(directory: Path) -> str | None:
    """HEAD of the git checkout holding ``directory`` (``+dirty`` with uncommitted changes), None outside one."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=directory, capture_output=True, text=True,
            timeout=5,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def header(argv: list[str], world_size: int) -> str:
    """The block that opens each start's part of ``train.log``."""
    source = Path(__file__).resolve().parent
    versions = ", ".join(f"{name} {_version(name)}" for name in _VERSIONED)
    lines = [
        "=" * 100,
        f"start {datetime.datetime.now().astimezone().isoformat(timespec='seconds')} on {platform.node()}",
        f"command: {shlex.join([sys.executable, *argv])}",
        f"cwd: {os.getcwd()}",
        f"git commit: {git_commit(source) or 'none (not a git checkout)'}",
        f"world size: {world_size}",
        f"versions: python {platform.python_version()}, {versions}",
        "=" * 100,
    ]
    return "\n".join(lines) + "\n"


class RunLog:
    """The run's ``logs/`` folder for this process: rank 0 keeps ``train.log``, every rank its errors."""

    def __init__(self, save_dir: str | Path, rank: int):
        self.dir = Path(save_dir) / LOG_DIR
        self.rank = rank
        self._handler: logging.Handler | None = None

    @property
    def train_log(self) -> Path:
        return self.dir / TRAIN_LOG

    def start(self, argv: list[str], world_size: int) -> None:
        """Rank 0: append this start's header to ``train.log`` and copy every ``mks2`` log line there."""
        if self.rank != 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with self.train_log.open("a", encoding="utf-8") as f:
            f.write(header(argv, world_size))
        handler = logging.FileHandler(self.train_log, encoding="utf-8")
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
        handler.setLevel(logging.INFO)
        for name in ("mks2", RUN_LOGGER):
            logging.getLogger(name).addHandler(handler)
        logging.getLogger(RUN_LOGGER).propagate = False  # on screen already, through the progress bar
        logging.getLogger(RUN_LOGGER).setLevel(logging.INFO)
        self._handler = handler

    def record_error(self, exc: BaseException) -> None:
        """Append ``exc`` to ``error_rank<R>.log`` (and, on rank 0, to ``train.log``). Never raises: the
        original error is what the user must see."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            when = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
            if isinstance(exc, UserError):
                body = f"error: {exc}\n"
            else:
                body = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            block = f"[{when}] rank {self.rank} stopped with a fatal error:\n{body}"
            with (self.dir / f"error_rank{self.rank}.log").open("a", encoding="utf-8") as f:
                f.write(block)
            if self.rank == 0:
                with self.train_log.open("a", encoding="utf-8") as f:
                    f.write(block)
        except OSError:
            pass

    def close(self) -> None:
        if self._handler is not None:
            for name in ("mks2", RUN_LOGGER):
                logging.getLogger(name).removeHandler(self._handler)
            self._handler.close()
            self._handler = None


def log_to_file(text: str) -> None:
    """A progress message for ``train.log`` only (the screen got it through the progress bar)."""
    logging.getLogger(RUN_LOGGER).info(text)


@contextlib.contextmanager
def logged_run(save_dir: str | Path, argv: list[str]) -> Iterator[RunLog]:
    """Open this start's part of ``<save_dir>/logs/`` around a launcher's work; a fatal error (user error,
    crash or Ctrl-C) is recorded there, then raised on."""
    run_log = RunLog(save_dir, env_rank())
    run_log.start(argv, env_world_size())
    try:
        yield run_log
    except SystemExit as exc:
        if exc.code not in (None, 0):
            run_log.record_error(exc)
        raise
    except BaseException as exc:
        run_log.record_error(exc)
        raise
    finally:
        run_log.close()
