"""Atomic output directories: build into a hidden temporary sibling, rename into place at the end.

An interrupted or failed export (exception, Ctrl-C, kill -9) never leaves anything at the output
path that looks complete: until the final ``os.rename`` the files live in ``.<name>.partial-<pid>``
next to it, which a later run removes once its process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from mks2.errors import UserError
from mks2.fileio import pid_alive

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.partial-(?P<pid>\d+)$")


class OutputExistsError(UserError, FileExistsError):
    """The output path already holds files and overwriting was not allowed."""


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete temporary directories of earlier, dead exports to ``out``."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for child in out.parent.iterdir():
        m = _PARTIAL.match(child.name)
        if m and m.group("name") == out.name and child.is_dir() and not pid_alive(int(m.group("pid"))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def check_output(out: Path, *, force: bool) -> None:
    """Refuse a non-empty ``out`` (or a file there) unless ``force``."""
    if out.exists() and not out.is_dir():
        if not force:
            raise OutputExistsError(f"output {out} exists and is not a directory; use --force to replace it")
    elif out.is_dir() and any(out.iterdir()) and not force:
        raise OutputExistsError(f"output directory {out} is not empty; use --force to replace it")


class ExportWriteError(UserError, OSError):
    """The export could not be written (a full disk or quota): names the file and the free space."""


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces ``out``, on any error it is deleted."""
    out = Path(out).expanduser().absolute()
    check_output(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free_mib = shutil.disk_usage(out.parent).free / 2**20
        raise ExportWriteError(
            f"{exc.filename or tmp}: {exc.strerror} ({free_mib:.1f} MiB free in {out.parent}); nothing was "
            f"written at {out}"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists() or out.is_symlink():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.rename(out, old)  # keep the old export until the new one is in place
        os.rename(tmp, out)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    else:
        os.rename(tmp, out)
