"""Per-rank state of a checkpoint (``mks2/rank_XXXXX.pt``): RNG states and the data-loader state.

Every rank writes its own file, so an exact resume restores each rank's random streams and data
position. The files hold tensors and plain containers only and load with ``weights_only=True``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mks2.checkpoint.errors import CheckpointError
from mks2.checkpoint.layout import rank_file
from mks2.checkpoint.safe_load import safe_load
from mks2.fileio import atomic_torch_save


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
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Seed python, numpy and torch (every device) from ``(seed, step, rank)``: the random streams of a
    resume on another data-parallel size, where the saved per-rank streams no longer match the ranks."""
    mixed = int(np.random.SeedSequence([int(seed), int(step), int(rank)]).generate_state(1)[0])
    random.seed(mixed)
    np.random.seed(mixed)
    torch.manual_seed(mixed)  # CPU and every CUDA device


def save_rank_state(ckpt: Path, rank: int, loader_state: Any) -> None:
    """Write this rank's RNG states and ``loader_state`` into checkpoint directory ``ckpt``."""
    atomic_torch_save({"rng": rng_state(), "loader": loader_state}, rank_file(ckpt, rank))


def load_rank_state(ckpt: Path, rank: int) -> dict[str, Any]:
    """``{"rng": ..., "loader": ...}`` as :func:`save_rank_state` wrote it for ``rank``."""
    path = rank_file(ckpt, rank)
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: the checkpoint was written by fewer ranks than this run has "
            "(exact resume needs the same world size)"
        )
    return safe_load(path, map_location="cpu")
