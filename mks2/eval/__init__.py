"""Evaluation of trained models (``tools/evaluate.py`` is the command line).

- ``load_for_eval(path)``: a training checkpoint (either parallel mode) or an HF export directory;
- ``evaluate_mc`` (multiple choice by log-likelihood), ``evaluate_open`` (greedy generation),
  ``evaluate_retrieval`` (stage-1 text-to-image recall@1/5);
- ``run_evaluation`` runs the requested files and returns one JSON-serialisable report.
"""

from mks2.eval.checkpoints import EvalModel, load_for_eval
from mks2.eval.report import run_evaluation, write_report
from mks2.eval.tasks import evaluate_mc, evaluate_open, evaluate_retrieval, recall_at_k

__all__ = [
    "EvalModel",
    "evaluate_mc",
    "evaluate_open",
    "evaluate_retrieval",
    "load_for_eval",
    "recall_at_k",
    "run_evaluation",
    "write_report",
]
