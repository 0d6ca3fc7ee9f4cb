"""Training under DeepSpeed: engine construction (``engine``, the one place that wraps with DeepSpeed),
the shared loop (``loop``), exact resume (through ``mks2.checkpoint``), faults (``faults``), logging
(``metrics``), batch arithmetic (``batch``), the pipeline LayerSpecs built from the model's pipeline
split (``pipeline``, ``pipeline_module``), and the stage tasks (``stage1``, ``stage2``: each a
``task.StageTask``)."""

from mks2.training.faults import TrainingAborted
from mks2.training.loop import Trainer, run_training
from mks2.training.task import StageTask

__all__ = ["StageTask", "Trainer", "TrainingAborted", "run_training"]
