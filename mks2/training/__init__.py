"""Training under DeepSpeed: engine construction (``engine``, the one place that wraps with DeepSpeed),
the shared loop (``loop``), exact resume (through ``mks2.checkpoint``), faults (``faults``), logging
(``metrics``), batch arithmetic (``batch``), the pipeline LayerSpecs built from the model's pipeline
split (``pipeline``, ``pipeline_module``), and the stage tasks (``stage1``, ``stage2``: each a
``task.StageTask``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mks2.training.faults import TrainingAborted
    from mks2.training.loop import Trainer, run_training
    from mks2.training.task import StageTask

__all__ = ["StageTask", "Trainer", "TrainingAborted", "run_training"]

# Imported on first use: the launchers import mks2.training.cli to answer --help and report config errors
# in under a second, before torch and DeepSpeed load (loop pulls in both).
_HOMES = {"StageTask": "task", "Trainer": "loop", "TrainingAborted": "faults", "run_training": "loop"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'mks2.training' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mks2.training.{_HOMES[name]}"), name)
