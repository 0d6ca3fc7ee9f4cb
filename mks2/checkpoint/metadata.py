"""The trainer's record of a checkpoint: ``mks2/trainer.json`` and ``mks2/config.json`` (rank 0).

``trainer.json`` holds the loop state (``loop``: step, tokens seen, skipped-step counters) and
the run (``run``: stage, parallel mode, world/data-parallel/pipeline sizes); ``config.json`` holds
the resolved run config (``mks2.config.to_dict``). This module is their one writer and one reader.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mks2.checkpoint.errors import CheckpointError
from mks2.checkpoint.layout import CLIENT_DIR, CONFIG_FILE, TRAINER_FILE
from mks2.config import ConfigError, ParallelMode, RunConfig, config_from_dict
from mks2.fileio import atomic_write_text


def write_meta(ckpt: Path, trainer_state: dict[str, Any], config: dict[str, Any]) -> None:
    """Write both files of checkpoint directory ``ckpt`` atomically (rank 0)."""
    atomic_write_text(ckpt / CLIENT_DIR / TRAINER_FILE, json.dumps(trainer_state, indent=2, sort_keys=True))
    atomic_write_text(ckpt / CLIENT_DIR / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))


def read_meta(ckpt: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(trainer state, resolved run config dict) of checkpoint directory ``ckpt``."""
    try:
        trainer = json.loads((ckpt / CLIENT_DIR / TRAINER_FILE).read_text())
        config = json.loads((ckpt / CLIENT_DIR / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(
            f"{ckpt}: cannot read the trainer's {CLIENT_DIR}/{TRAINER_FILE} or {CONFIG_FILE} ({exc})"
        ) from exc
    return trainer, config


@dataclass
class TrainingCheckpoint:
    """One complete checkpoint directory and what the trainer recorded with it."""

    path: Path
    config: RunConfig  # the run config that wrote it (it rebuilds the model)
    config_dict: dict[str, Any]
    trainer: dict[str, Any]

    @classmethod
    def read(cls, path: Path) -> TrainingCheckpoint:
        """Read the record of checkpoint directory ``path``; a saved run config that no longer
        validates is a CheckpointError naming the file."""
        trainer, config_dict = read_meta(path)
        try:
            config = config_from_dict(config_dict)
        except ConfigError as exc:
            where = path / CLIENT_DIR / CONFIG_FILE
            raise CheckpointError(f"{where}: the saved run config is invalid:\n{exc}") from exc
        return cls(path=path, config=config, config_dict=config_dict, trainer=trainer)

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def mode(self) -> ParallelMode:
        return ParallelMode(self.trainer.get("run", {}).get("mode") or self.config.parallel.mode)

    @property
    def step(self) -> int | None:
        return self.trainer.get("loop", {}).get("step")
