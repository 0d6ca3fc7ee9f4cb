"""Checkpoint layout, completion marker, discovery for resume, retention, and per-rank RNG state.

Layout of ``train.save_dir`` (one directory per saved optimizer step)::

    <save_dir>/
      step_00000010/                 DeepSpeed's files (model / optimizer / scheduler state; in pipeline
                                     mode one layer_XX-model_states.pt per LayerSpec)
        mks2/trainer.json            step, stage, parallel mode, world/data-parallel/pipeline sizes,
                                     consumed samples, skipped-step counters (rank 0)
        mks2/config.json             the resolved run config (mks2.config.to_dict) (rank 0)
        mks2/rank_00000.pt ...       one per rank: python/numpy/torch(/accelerator) RNG states and the
                                     rank's data-loader state (torch.save of tensors/containers only)
        COMPLETE                     written LAST by rank 0 after every rank finished (a barrier)
      latest                         tag of the newest COMPLETE checkpoint (what DeepSpeed's readers use)
      metrics.jsonl                  one JSON object per optimizer step

A directory without ``COMPLETE`` is not a checkpoint: resume ignores it and retention deletes it.
DeepSpeed's own ``latest`` is not written (``save_latest=False``); ours is only updated after the
marker, so it never points at a partial save.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

MARKER = "COMPLETE"
CLIENT_DIR = "mks2"
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


class CheckpointError(RuntimeError):
    """A requested resume cannot be honoured; the message says why and what to do."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file + rename (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    tag: str
    step: int
    path: Path


def list_checkpoints(save_dir: str | Path) -> tuple[list[Found], list[Found]]:
    """(complete, incomplete) checkpoints under ``save_dir``, each sorted by step."""
    root = Path(save_dir)
    complete: list[Found] = []
    incomplete: list[Found] = []
    if not root.is_dir():
        return complete, incomplete
    for child in root.iterdir():
        m = TAG_RE.match(child.name)
        if not m or not child.is_dir():
            continue
        found = Found(tag=child.name, step=int(m.group(1)), path=child)
        (complete if (child / MARKER).is_file() else incomplete).append(found)
    complete.sort(key=lambda f: f.step)
    incomplete.sort(key=lambda f: f.step)
    return complete, incomplete


def find_resume(save_dir: str | Path, resume: str) -> Found | None:
    """Resolve ``train.resume`` to a checkpoint (or None for a fresh start).

    ``none``: fresh start. ``auto``: newest complete checkpoint, if any. ``require``: newest complete
    checkpoint, error if none. Anything else is a tag (``step_00000010``) or a step number.
    """
    if resume == "none":
        return None
    complete, incomplete = list_checkpoints(save_dir)
    if resume in ("auto", "require"):
        if complete:
            return complete[-1]
        if resume == "auto":
            return None
        partial = (
            f"; incomplete (no {MARKER} marker, ignored): {', '.join(f.tag for f in incomplete)}" if incomplete else ""
        )
        raise CheckpointError(
            f"train.resume=require but {save_dir} holds no complete checkpoint{partial}. "
            "Start a fresh run with train.resume=auto or none, or point train.save_dir at the run to continue."
        )
    tag = tag_for(int(resume)) if resume.isdigit() else resume
    for f in complete:
        if f.tag == tag:
            return f
    if any(f.tag == tag for f in incomplete):
        raise CheckpointError(
            f"train.resume={resume}: {Path(save_dir) / tag} is incomplete (no {MARKER} marker: the save was "
            "interrupted); pick another tag or train.resume=auto"
        )
    available = ", ".join(f.tag for f in complete) or "none"
    raise CheckpointError(f"train.resume={resume}: no checkpoint {tag} in {save_dir} (complete ones: {available})")


# --------------------------------------------------------------------------------------------
# Config compatibility
# --------------------------------------------------------------------------------------------


def _get(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def shape_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable list of model-shape keys that differ between two resolved config dicts."""
    out = []
    for key in SHAPE_KEYS:
        a, b = _get(saved, key), _get(current, key)
        if key == "model.num_kv_heads":  # None means "= num_heads"
            a = a if a is not None else _get(saved, "model.num_heads")
            b = b if b is not None else _get(current, "model.num_heads")
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


# --------------------------------------------------------------------------------------------
# RNG state (per rank)
# --------------------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch CPU and accelerator RNG states, as tensors/containers (weights_only-safe)."""
    py = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": {
            "name": np_state[0],
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rank_file(ckpt: Path, rank: int) -> Path:
    return ckpt / CLIENT_DIR / f"rank_{rank:05d}.pt"


def save_rank_state(ckpt: Path, rank: int, loader_state: Any) -> None:
    atomic_torch_save({"rng": rng_state(), "loader": loader_state}, rank_file(ckpt, rank))


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    path = rank_file(ckpt, rank)
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the checkpoint was written by fewer ranks than this run has "
            "(exact resume needs the same world size)"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


def write_meta(ckpt: Path, trainer_state: dict[str, Any], config: dict[str, Any]) -> None:
    atomic_write_text(ckpt / CLIENT_DIR / "trainer.json", json.dumps(trainer_state, indent=2, sort_keys=True))
    atomic_write_text(ckpt / CLIENT_DIR / "config.json", json.dumps(config, indent=2, sort_keys=True))


def read_meta(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        trainer = json.loads((ckpt / CLIENT_DIR / "trainer.json").read_text())
        config = json.loads((ckpt / CLIENT_DIR / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{ckpt}: unreadable trainer state or config ({exc})") from exc
    return trainer, config


def mark_complete(save_dir: Path, ckpt: Path) -> None:
    """Rank 0, after a barrier that follows every rank's writes: the marker, then ``latest``."""
    atomic_write_text(ckpt / MARKER, json.dumps({"tag": ckpt.name}) + "\n")
    atomic_write_text(save_dir / "latest", ckpt.name)


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
