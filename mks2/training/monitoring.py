"""Experiment trackers beside ``metrics.jsonl``: which optional packages a run's config needs (checked
before any model is built) and the Weights & Biases run of rank 0.

TensorBoard and CSV go through DeepSpeed's monitor (``mks2.training.ds_config`` fills its sections).
W&B does not: DeepSpeed's ``WandbMonitor`` takes no run name and writes into the working directory,
so rank 0 opens its own run with the ``train.wandb_*`` keys and its files under ``<save_dir>/wandb``.

One W&B run per training run: the run's id is kept in ``<save_dir>/wandb/run_id``, and a start that
resumes a checkpoint reopens that run (``wandb.init(id=..., resume="allow")``, offline mode included:
the offline run directory carries the same id, and ``wandb sync`` appends to the same run). A start that
trains from scratch opens a new run and records its id. W&B keeps the steps of a run increasing: steps
logged after the checkpoint by the interrupted start are not re-plotted when the resume recomputes them
(``metrics.jsonl`` is the record that is truncated and rewritten).
"""

from __future__ import annotations

import importlib.util
import math
import secrets
import string
from pathlib import Path
from typing import Any

from mks2.config import RunConfig, to_dict
from mks2.fileio import atomic_write_text

RUN_ID_FILE = "run_id"  # under <save_dir>/wandb

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


def _new_run_id() -> str:
    """8 base-36 characters, as wandb's own ids; from ``secrets`` (no global RNG: exact resume)."""
    return "".join(secrets.choice(string.digits + string.ascii_lowercase) for _ in range(8))


def wandb_run_id(save_dir: str | Path, *, resuming: bool) -> str:
    """The W&B run id of this start: the one recorded in ``<save_dir>/wandb/run_id`` when ``resuming``
    (a checkpoint was loaded) and there is one, else a new one, recorded for the next resume."""
    path = Path(save_dir) / "wandb" / RUN_ID_FILE
    if resuming and path.is_file():
        recorded = path.read_text().strip()
        if recorded:
            return recorded
    run_id = _new_run_id()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, run_id + "\n")
    return run_id


class WandbRun:
    """Rank 0's Weights & Biases run; ``WANDB_MODE`` (``offline``, ``disabled``) is honoured by wandb.
    ``resuming``: this start continues a checkpoint, so it continues the W&B run of that save_dir."""

    def __init__(self, cfg: RunConfig, *, resuming: bool = False):
        import wandb

        t = cfg.train
        save_dir = Path(t.save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        self._wandb = wandb
        self.run_id = wandb_run_id(save_dir, resuming=resuming)
        self.run = wandb.init(
            project=t.wandb_project,
            name=t.wandb_run_name or save_dir.resolve().name,
            entity=t.wandb_entity or None,
            dir=str(save_dir),
            config=to_dict(cfg),
            id=self.run_id,
            resume="allow",  # the run of that id if W&B has it, else a new one under that id
        )

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record at its optimizer step; evaluation keys (``eval_*``) land in their own panel."""
        values = {
            (f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): v for k, v in numeric_items(record).items()
        }
        self.run.log(values, step=int(record["step"]))

    def finish(self) -> None:
        self.run.finish()
