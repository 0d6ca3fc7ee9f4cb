"""One run per ``train.save_dir``: an exclusive lock held by rank 0 for the whole run.

Two runs writing into one ``save_dir`` would overwrite each other's ``step_*`` directories and
interleave ``metrics.jsonl``. The lock is ``<save_dir>/.mks2_run.lock``: rank 0 holds an ``fcntl.flock``
on it until the run ends (the kernel drops it when the process dies, however it dies) and writes the
holder into it (host, PID, start time) so a refused run can name it. A lock file whose holder is gone
(no flock held, and on this host no live process with its PID) is stale: it is taken over with a
warning. Once the lock is ours, every ``step_*`` directory without ``COMPLETE`` is debris of a dead run
(an interrupted or failed save) and is removed before anything reads the directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any

from mks2.checkpoint.errors import CheckpointError
from mks2.checkpoint.layout import list_checkpoints
from mks2.fileio import pid_alive

LOCK_FILE = ".mks2_run.lock"


class SaveDirBusyError(CheckpointError):
    """Another live run holds the ``save_dir`` lock (the message names its host, PID and start time)."""


def _describe(holder: dict[str, Any]) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, (int, float)) else "?"
    return f"host {holder.get('host', '?')}, PID {holder.get('pid', '?')}, started {when}"


def _read_holder(f: IO[str]) -> dict[str, Any]:
    f.seek(0)
    try:
        holder = json.loads(f.read() or "{}")
    except json.JSONDecodeError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive_here(holder: dict[str, Any]) -> bool:
    """Whether the holder is a live process on THIS host other than us (filesystems where flock is a
    no-op still refuse a second run started on the same machine)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    return pid_alive(pid)


class SaveDirLock:
    """``with SaveDirLock(save_dir) as lock:`` (or ``acquire``/``release``); ``lock.warnings`` holds
    the takeover and clean-up notes to log."""

    def __init__(self, save_dir: str | Path):
        self.save_dir = Path(save_dir)
        self.path = self.save_dir / LOCK_FILE
        self._file: IO[str] | None = None
        self.warnings: list[str] = []

    def acquire(self) -> SaveDirLock:
        self.save_dir.mkdir(parents=True, exist_ok=True)
        f = self._lock_file()
        holder = _read_holder(f)
        if holder and _alive_here(holder):
            f.close()
            raise self._busy(holder)
        if holder:
            self.warnings.append(f"{self.path}: taking over the lock of a run that is gone ({_describe(holder)})")
        mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        f.seek(0)
        f.truncate()
        f.write(json.dumps(mine) + "\n")
        f.flush()
        os.fsync(f.fileno())
        self._file = f
        self.warnings += remove_incomplete(self.save_dir)
        return self

    def _lock_file(self) -> IO[str]:
        """The lock file, flocked. Retried when the file we locked was unlinked meanwhile by a holder
        releasing it (then a third run could lock a new file at the same path)."""
        for _ in range(10):
            f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 -- held open for the whole run
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(f)
                f.close()
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise CheckpointError(f"{self.path}: cannot lock train.save_dir ({exc.strerror})") from None
                raise self._busy(holder) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(f.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return f
            f.close()
        raise CheckpointError(f"{self.path}: the lock file keeps changing; is another run starting right now?")

    def _busy(self, holder: dict[str, Any]) -> SaveDirBusyError:
        return SaveDirBusyError(
            f"train.save_dir {self.save_dir} is in use by another run ({_describe(holder)}; lock {self.path}). "
            "Wait for it to finish, or choose another train.save_dir"
        )

    def release(self) -> None:
        if self._file is None:
            return
        self.path.unlink(missing_ok=True)  # while still locked: nobody reads a half-released lock
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
        self._file = None

    def __enter__(self) -> SaveDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_incomplete(save_dir: Path) -> list[str]:
    """Delete every ``step_*`` directory without ``COMPLETE`` (only safe while holding the lock: no
    live run is writing one). Returns one note per deleted directory."""
    _, incomplete = list_checkpoints(save_dir)
    notes = []
    for c in incomplete:
        shutil.rmtree(c.path, ignore_errors=True)
        notes.append(f"{c.path}: removed an incomplete checkpoint left by an earlier run (no COMPLETE marker)")
    return notes
