"""Finding a complete checkpoint: the one ``find``, used by resume, stage 2, export and eval.

``find(location, tag)`` takes what a user points at: a ``train.save_dir`` (then ``tag``, or the
newest complete checkpoint in it) or one checkpoint directory. A directory without the completion
marker is never returned: its save was interrupted or is still running. Callers pass ``key``, the
config key or option the location came from, so the message names what to fix.
"""

from __future__ import annotations

from pathlib import Path

from mks2.checkpoint.errors import CheckpointError
from mks2.checkpoint.layout import MARKER, CheckpointDir, is_complete, list_checkpoints, looks_like_checkpoint, tag_for
from mks2.checkpoint.metadata import TrainingCheckpoint


def _tags(found: list[CheckpointDir]) -> str:
    return ", ".join(f.tag for f in found)


def normalize_tag(tag: str | int) -> str:
    """``10`` / ``"10"`` -> ``step_00000010``; any other string is a tag as it is."""
    return tag_for(int(tag)) if str(tag).isdigit() else str(tag)


def find(location: str | Path, tag: str | int | None = None, *, key: str | None = None) -> CheckpointDir:
    """The complete checkpoint at ``location`` (see module docstring).

    ``tag``: ``step_00000010``, a step number, or None for ``location`` itself when it is a
    checkpoint directory, else the newest complete checkpoint in it. Raises CheckpointError (prefixed
    with ``key``) when there is none, naming the complete checkpoints there are."""
    where = f"{key}: " if key else ""
    root = Path(location).expanduser()
    if not root.exists():
        raise CheckpointError(f"{where}checkpoint directory {root} does not exist")
    if not root.is_dir():
        raise CheckpointError(f"{where}{root} is not a directory (expected a train.save_dir or a checkpoint in it)")
    if tag is None and looks_like_checkpoint(root):
        path = root
    elif tag is None:
        complete, incomplete = list_checkpoints(root)
        if not complete:
            partial = f"; incomplete (no {MARKER} marker, ignored): {_tags(incomplete)}" if incomplete else ""
            raise CheckpointError(f"{where}{root} holds no complete checkpoint{partial}")
        path = complete[-1].path
    else:
        path = root / normalize_tag(tag)
        if not path.is_dir():
            complete, _ = list_checkpoints(root)
            raise CheckpointError(
                f"{where}no checkpoint {path.name} in {root} (complete ones: {_tags(complete) or 'none'})"
            )
    if not is_complete(path):
        raise CheckpointError(
            f"{where}{path} is not a complete checkpoint: it has no {MARKER} marker, so its save is incomplete "
            "(interrupted, or still running). Pick another tag or wait for the save to finish."
        )
    return CheckpointDir.at(path)


def find_checkpoint(location: str | Path, tag: str | int | None = None) -> TrainingCheckpoint:
    """:func:`find`, then the trainer's record of that checkpoint (its run config parsed)."""
    return TrainingCheckpoint.read(find(location, tag).path)


def find_resume(save_dir: str | Path, resume: str) -> CheckpointDir | None:
    """Resolve ``train.resume`` to a checkpoint in ``save_dir``, or None for a fresh start.

    ``none``: fresh start. ``auto``: the newest complete checkpoint, if any. ``require``: the newest
    complete checkpoint, an error if none. Anything else is a tag (``step_00000010``) or a step number."""
    if resume == "none":
        return None
    if resume not in ("auto", "require"):
        return find(save_dir, resume, key=f"train.resume={resume}")
    complete, incomplete = list_checkpoints(save_dir)
    if complete:
        return complete[-1]
    if resume == "auto":
        return None
    partial = f"; incomplete (no {MARKER} marker, ignored): {_tags(incomplete)}" if incomplete else ""
    raise CheckpointError(
        f"train.resume=require but {save_dir} holds no complete checkpoint{partial}. "
        "Start a fresh run with train.resume=auto or none, or point train.save_dir at the run to continue."
    )
