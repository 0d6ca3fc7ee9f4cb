"""What rank 0 writes after every rank's files are saved: the completion marker, ``latest``, and
retention (deleting old and interrupted checkpoints).

DeepSpeed writes its own ``latest`` before all ranks finish writing, so the trainer saves with
``save_latest=False`` and writes ``latest`` here, after the marker: it never points at a partial save.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mks2.checkpoint.layout import LATEST, MARKER, list_checkpoints
from mks2.fileio import atomic_write_text


def mark_complete(save_dir: Path, ckpt: Path) -> None:
    """Rank 0, after a barrier that follows every rank's writes: the marker, then ``latest``."""
    atomic_write_text(ckpt / MARKER, json.dumps({"tag": ckpt.name}) + "\n")
    atomic_write_text(save_dir / LATEST, ckpt.name)


def prune(save_dir: Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete checkpoints, and incomplete ones older than
    the newest complete checkpoint (left by an interrupted save). Rank 0 only. Returns deleted tags."""
    complete, incomplete = list_checkpoints(save_dir)
    doomed = complete[:-keep_last] if keep_last > 0 else []
    if complete:
        doomed += [f for f in incomplete if f.step < complete[-1].step]
    for f in doomed:
        # Un-mark first: a crash mid-delete must not leave a half-deleted directory marked complete.
        (f.path / MARKER).unlink(missing_ok=True)
        shutil.rmtree(f.path, ignore_errors=True)
    return [f.tag for f in doomed]
