"""Names inside ``train.save_dir`` (drawn in ``mks2.checkpoint``'s docstring) and how to list them.

Also which model-config keys make a checkpoint's tensors the wrong shape (``shape_changes``), the
check a resume runs before DeepSpeed reads any tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MARKER = "COMPLETE"
"""Written last in a checkpoint directory, by rank 0 after every rank finished its files."""
CLIENT_DIR = "mks2"
"""The trainer's own files inside a checkpoint directory (metadata, per-rank state)."""
TRAINER_FILE = "trainer.json"
CONFIG_FILE = "config.json"
LATEST = "latest"
"""Tag of the newest complete checkpoint (what DeepSpeed's own readers look for)."""
TAG_RE = re.compile(r"^step_(\d{8})$")

# Model-config keys whose change makes a checkpoint's tensors the wrong shape (or wrong meaning).
SHAPE_KEYS = (
    "model.stage",
    "model.vocab_size",
    "model.hidden_size",
    "model.intermediate_size",
    "model.num_layers",
    "model.num_heads",
    "model.num_kv_heads",
    "model.tie_word_embeddings",
    "model.mvm.placement",
    "model.mvm.layers",
    "model.mvm.intermediate_size",
    "model.lora.rank",
    "model.lora.targets",
    "model.mome.use_mvm",
    "model.vision.kind",
)


# Run-config keys that fix the order of the data: a resume with another value would neither continue
# the saved sampler position nor start a fresh order cleanly.
DATA_ORDER_KEYS = ("train.seed",)


def tag_for(step: int) -> str:
    """Directory name of the checkpoint saved after optimizer step ``step``."""
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    """The step number in a ``step_XXXXXXXX`` tag (None for any other name)."""
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def rank_file(ckpt: Path, rank: int) -> Path:
    """The per-rank state file (RNG and data-loader state) of ``rank`` in checkpoint ``ckpt``."""
    return ckpt / CLIENT_DIR / f"rank_{rank:05d}.pt"


def is_complete(ckpt: Path) -> bool:
    return (ckpt / MARKER).is_file()


def looks_like_checkpoint(path: Path) -> bool:
    """Whether ``path`` is one checkpoint directory (complete or not) rather than a ``save_dir``."""
    return (path / MARKER).exists() or (path / CLIENT_DIR).is_dir() or bool(TAG_RE.match(path.name))


@dataclass(frozen=True)
class CheckpointDir:
    """One checkpoint directory: its tag (the directory name), step (None if the name is not a
    ``step_XXXXXXXX`` tag) and path."""

    tag: str
    step: int | None
    path: Path

    @classmethod
    def at(cls, path: Path) -> CheckpointDir:
        return cls(tag=path.name, step=step_of(path.name), path=path)


def list_checkpoints(save_dir: str | Path) -> tuple[list[CheckpointDir], list[CheckpointDir]]:
    """(complete, incomplete) ``step_XXXXXXXX`` checkpoints under ``save_dir``, each sorted by step;
    two empty lists when ``save_dir`` does not exist."""
    root = Path(save_dir)
    complete: list[CheckpointDir] = []
    incomplete: list[CheckpointDir] = []
    if not root.is_dir():
        return complete, incomplete
    for child in root.iterdir():
        if not TAG_RE.match(child.name) or not child.is_dir():
            continue
        (complete if is_complete(child) else incomplete).append(CheckpointDir.at(child))
    complete.sort(key=lambda f: f.step)
    incomplete.sort(key=lambda f: f.step)
    return complete, incomplete


def dotted_get(d: dict[str, Any], dotted: str, default: Any = None) -> Any:
    """Value at a dotted key (``model.mvm.layers``) of a saved config dict, ``default`` when a level is missing."""
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def shape_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of model-shape keys that differ between two resolved config dicts."""
    out = []
    for key in SHAPE_KEYS:
        a, b = dotted_get(saved, key), dotted_get(current, key)
        if key == "model.num_kv_heads":  # None means "= num_heads"
            a = a if a is not None else dotted_get(saved, "model.num_heads")
            b = b if b is not None else dotted_get(current, "model.num_heads")
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


def resume_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """:func:`shape_changes` plus the data-order keys (``train.seed``) that differ: what forbids a resume."""
    out = shape_changes(saved, current)
    for key in DATA_ORDER_KEYS:
        a, b = dotted_get(saved, key), dotted_get(current, key)
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r} (the saved data order depends on it)")
    return out
