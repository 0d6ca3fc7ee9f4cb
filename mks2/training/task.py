"""What differs between training stages: the model, the data and the batch -> loss step. Everything
else (engine, loop, checkpoints, resume, faults, logging) is shared and lives in ``engine.py`` /
``loop.py``, which use a stage only through :class:`StageTask`:

- ``check``: problems found before start-up, reported with the config errors (default: every input
  path exists);
- ``build_model``: the initialised, correctly frozen ``MKS2ForCausalLM`` (stage 2 also loads a
  stage-1 checkpoint);
- ``build_loader``: this data-parallel rank's resumable iterable of training batches;
- ``prepare``: a loader batch -> the tensors the step consumes, on the device, with the frozen vision
  outputs computed outside the engine;
- ``objective`` (+ ``external_parameters``): the ``nn.Module`` the ZeRO-3 engine wraps; its forward
  returns the micro-batch's loss and records the metrics in ``sink``;
- ``pipeline`` / ``pipeline_tuples``: the same step as a :class:`~mks2.training.pipeline.PipelineSpec`
  for ``deepspeed.pipe`` and the (first-stage inputs, last-stage labels) tuples that feed it;
- ``evaluate``, ``count_tokens``, ``count_positions``: held-out metrics and throughput counts.

The engine builder hands back one thing: ``dp_group``, the data-parallel process group, once it exists.
"""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from mks2.config import RunConfig, Stage
from mks2.training.pipeline import PipelineSpec


class MetricSink:
    """Collects detached per-micro-batch metrics where the loss is computed (the objective module in
    ZeRO-3 mode, the loss callable on the last pipeline stage); the loop drains it once per step."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self._rows: list[torch.Tensor] = []

    def record(self, values: dict[str, torch.Tensor]) -> None:
        self._rows.append(torch.stack([values[n].detach().float().reshape(()) for n in self.names]))

    def drain(self, device: torch.device) -> tuple[torch.Tensor, int]:
        """(sum over recorded micro-batches [len(names)], number of micro-batches); clears the sink."""
        count = len(self._rows)
        total = torch.stack(self._rows).sum(0).to(device) if count else torch.zeros(len(self.names), device=device)
        self._rows.clear()
        return total, count


def check_paths(cfg: RunConfig) -> list[str]:
    """Cheap existence/format checks of model.init_from, model.vision.path and every dataset's
    manifest, so a typo fails in seconds instead of after loading a 7B model."""
    from mks2.config import VisionKind
    from mks2.data.dataset import read_manifest

    problems: list[str] = []
    checks = []
    if cfg.model.init_from:
        from mks2.model.hf_loading import read_hf_llama_config

        checks.append(lambda: read_hf_llama_config(cfg.model.init_from))
    if VisionKind(cfg.model.vision.kind) != VisionKind.NONE:
        from mks2.model.vision import read_vision_checkpoint

        checks.append(lambda: read_vision_checkpoint(cfg.model))
    for key, sources in (("data.datasets", cfg.data.datasets), ("data.eval_datasets", cfg.data.eval_datasets)):
        for i, src in enumerate(sources):
            checks.append(lambda k=key, i=i, path=src.path: _prefixed(f"{k}[{i}]", read_manifest, path))
    for check in checks:
        try:
            check()
        except ValueError as exc:  # DatasetError and the model's loading errors are ValueErrors
            problems.append(str(exc))
    return problems


def _prefixed(where: str, fn, *args):
    try:
        return fn(*args)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from exc


class StageTask(abc.ABC):
    """Stage-specific part of training (see module docstring)."""

    stage: Stage
    metric_names: tuple[str, ...] = ()
    """Per-micro-batch metrics besides ``loss`` averaged into each step's record."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.sink = MetricSink(self.metric_names)
        self.dp_group: Any = None
        """This rank's data-parallel process group (a ``torch.distributed`` group), set by the engine
        builder (``engine.build_engine``) before the first step; the losses gather over it (stage 1's
        retrieval negatives span the whole data-parallel batch). None before the engine exists."""

    def check(self, cfg: RunConfig) -> list[str]:
        """Problems found before start-up (reported together with the other config errors): every
        path the run will read exists and is of the right kind. Stages extend this."""
        return check_paths(cfg)

    def build_model(self, cfg: RunConfig, *, weight_gather=None) -> nn.Module:
        from mks2.model import build_model

        return build_model(cfg, weight_gather=weight_gather)

    @abc.abstractmethod
    def build_loader(self, cfg: RunConfig, *, dp_rank: int, dp_size: int, state: Any = None) -> Any:
        """This data-parallel rank's infinite iterable of batches, continuing from ``state`` (a previous
        ``loader.state_dict()``, saved in every checkpoint) when given; ``state_dict()`` must describe
        the batches handed out so far (not those prefetched), for exact resume."""

    @abc.abstractmethod
    def prepare(self, batch: dict[str, torch.Tensor], vision: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """Loader batch -> the objective's keyword arguments (on ``device``)."""

    @abc.abstractmethod
    def objective(self, model: nn.Module) -> nn.Module:
        """Module wrapped by the ZeRO-3 engine: ``forward(**prepared)`` -> the 0-d loss; the metrics go to
        ``self.sink``."""

    def external_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters the objective's forward reads directly, outside their owner's forward; ZeRO-3
        gathers them whenever the objective runs (``deepspeed.zero.register_external_parameter``)."""
        return []

    @abc.abstractmethod
    def pipeline(self, model: nn.Module) -> PipelineSpec:
        """The same step split for ``deepspeed.pipe``: ``mks2.training.pipeline.build_pipeline_spec`` with
        the stage's head and loss callable. ``spec.release()`` is called once this rank's layers exist."""

    @abc.abstractmethod
    def pipeline_tuples(self, prepared: dict[str, torch.Tensor]) -> tuple[tuple, tuple]:
        """Prepared batch -> (first-stage inputs, last-stage labels) for the pipeline engine."""

    def evaluate(self, trainer: Any) -> dict[str, float]:
        """Held-out evaluation run by every rank together (``train.eval_interval``); metrics merged into
        that step's record. Default: none."""
        return {}

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real (non-padding) tokens processed for this batch, for tokens/s."""
        return int((batch["segment_ids"] != 0).sum())

    def count_positions(self, batch: dict[str, torch.Tensor]) -> int:
        """Token positions the model computes for this batch (padding included), for the FLOPs estimate."""
        return int(batch["input_ids"].numel())
