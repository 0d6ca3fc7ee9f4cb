"""Training under DeepSpeed: engine construction (``engine``), the shared loop (``loop``),
exact resume (through ``mks2.checkpoint``), faults (``faults``), logging (``metrics``), and the
stage-specific steps (``stage1``; stage 2 plugs in through ``task.StageTask``)."""

from mks2.training.faults import TrainingAborted
from mks2.training.loop import Trainer, run_training
from mks2.training.task import StageTask

__all__ = ["StageTask", "Trainer", "TrainingAborted", "run_training"]
