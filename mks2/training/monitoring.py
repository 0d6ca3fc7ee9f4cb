"""Experiment trackers beside ``metrics.jsonl``: which optional packages a run's config needs (checked
before any model is built) and the Weights & Biases run of rank 0.

TensorBoard and CSV go through DeepSpeed's monitor (``mks2.training.ds_config`` fills its sections).
W&B does not: DeepSpeed's ``WandbMonitor`` takes no run name and writes into the working directory,
so rank 0 opens its own run with the ``train.wandb_*`` keys and its files under ``<save_dir>/wandb``.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from mks2.config import RunConfig, to_dict

# config key -> (module it needs, what installs it)
_NEEDS = {
    "train.tensorboard": ("tensorboard", "pip install tensorboard (pinned in requirements-ci.txt)"),
    "train.wandb": ("wandb", "pip install wandb (pinned in requirements-ci.txt)"),
}


def monitoring_problems(cfg: RunConfig) -> list[str]:
    """One line per enabled tracker whose package is not installed (so the run fails in seconds, not
    after the model is built)."""
    enabled = {"train.tensorboard": cfg.train.tensorboard, "train.wandb": cfg.train.wandb}
    problems = []
    for key, (module, install) in _NEEDS.items():
        if enabled[key] and importlib.util.find_spec(module) is None:
            problems.append(f"{key}=true needs the '{module}' package, which is not installed: {install}")
    return problems


def numeric_items(record: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics record, without ``step`` (what a tracker can plot)."""
    return {
        k: float(v)
        for k, v in record.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class WandbRun:
    """Rank 0's Weights & Biases run; ``WANDB_MODE`` (``offline``, ``disabled``) is honoured by wandb."""

    def __init__(self, cfg: RunConfig):
        import wandb

        t = cfg.train
        save_dir = Path(t.save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run = wandb.init(
            project=t.wandb_project,
            name=t.wandb_run_name or save_dir.resolve().name,
            entity=t.wandb_entity or None,
            dir=str(save_dir),
            config=to_dict(cfg),
        )

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record at its optimizer step; evaluation keys (``eval_*``) land in their own panel."""
        values = {
            (f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in numeric_items(record).items()
        }
        self.run.log(values, step=int(record["step"]))

    def finish(self) -> None:
        self.run.finish()
