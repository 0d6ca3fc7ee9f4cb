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
- ``evaluate``: held-out metrics;
- ``counts`` (from ``count_samples``, ``count_tokens``, ``count_positions``, ``count_head_tokens``,
  ``count_image_tokens``, ``count_retrieval_tokens``, ``segment_lengths``): what one loader batch makes
  the model compute, for the
  step's ``samples`` / ``tokens`` / ``positions`` / ``padding_fraction`` / ``flops`` / ``mfu``
  (definitions: :class:`BatchCounts`). A stage (or a batch layout) overrides the small methods.

The engine builder hands back one thing: ``dp_group``, the data-parallel process group, once it exists.
"""

from __future__ import annotations

import abc
from dataclasses import astuple, dataclass, fields
from typing import Any

import torch
from torch import nn

from mks2.config import RunConfig, Stage
from mks2.training.pipeline import PipelineSpec


@dataclass(frozen=True)
class BatchCounts:
    """What the model computes for one batch (or, summed, for one optimizer step). Every view counts:
    stage 1's caption view (image prefix included) and retrieval view are both ``tokens``."""

    samples: int = 0
    """Captions (stage 1) or instruction samples (stage 2) of the batch."""
    tokens: int = 0
    """Real (non-padding) token positions processed, every view, image-prefix positions included."""
    positions: int = 0
    """Token positions the decoder computes, padding included (``tokens <= positions``)."""
    head_tokens: int = 0
    """Real tokens whose logits the LM head computes (stage 1: the caption view; stage 2: all)."""
    image_tokens: int = 0
    """Image-prefix positions (the trainable mapping runs on each)."""
    attention_pairs: int = 0
    """Causal (query, key) pairs of real tokens: ``sum n (n + 1) / 2`` over the segments (n real tokens
    each; attention never crosses segments)."""
    retrieval_tokens: int = 0
    """Real tokens the stage-1 retrieval projection runs on (one EOS state per caption when it picks them
    before projecting); 0 in stage 2."""

    def __add__(self, other: BatchCounts) -> BatchCounts:
        return BatchCounts(*(a + b for a, b in zip(astuple(self), astuple(other), strict=True)))

    def as_list(self) -> list[float]:
        return [float(v) for v in astuple(self)]

    @classmethod
    def from_list(cls, values: Any) -> BatchCounts:
        """Inverse of :meth:`as_list` (e.g. after an all-reduce; float64 holds these counts exactly)."""
        return cls(*(round(float(v)) for v in values))

    @classmethod
    def size(cls) -> int:
        return len(fields(cls))

    @property
    def padding_fraction(self) -> float:
        """1 - tokens / positions: the share of computed positions that are padding."""
        return 1.0 - self.tokens / self.positions if self.positions else 0.0


def segment_lengths(segment_ids: torch.Tensor) -> torch.Tensor:
    """Segment ids [B, S] (0 = padding, k = k-th document of the row, each contiguous) -> the real
    length of every segment, int64 [number of segments], rows in order."""
    seg = segment_ids.long()
    if seg.numel() == 0:
        return torch.zeros(0, dtype=torch.long)
    rows = torch.arange(seg.shape[0], device=seg.device)[:, None] * (int(seg.max()) + 1)
    key = torch.where(seg != 0, seg + rows, torch.full_like(seg, -1))  # [B, S], unique per (row, segment)
    values, runs = torch.unique_consecutive(key.flatten(), return_counts=True)
    return runs[values >= 0].cpu()


def causal_pairs(lengths: torch.Tensor) -> int:
    """Causal (query, key) pairs of segments of these lengths: sum n (n + 1) / 2."""
    n = lengths.long()
    return int((n * (n + 1) // 2).sum())


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

    def build_model(self, cfg: RunConfig, *, weight_gather=None, **build: Any) -> nn.Module:
        """``build``: ``mks2.model.build_model``'s stage-local / read-once options (``keep``,
        ``read_weights``, ``vision_towers``), set by the engine builder per mode and rank."""
        from mks2.model import build_model

        return build_model(cfg, weight_gather=weight_gather, **build)

    @abc.abstractmethod
    def build_loader(self, cfg: RunConfig, *, dp_rank: int, dp_size: int, state: Any = None) -> Any:
        """This data-parallel rank's infinite iterable of batches, continuing from ``state`` (a previous
        ``loader.state_dict()``, saved in every checkpoint) when given; ``state_dict()`` must describe
        the batches handed out so far (not those prefetched), for exact resume."""

    @abc.abstractmethod
    def prepare(self, batch: dict[str, torch.Tensor], vision: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """Loader batch -> the objective's keyword arguments (on ``device``). ``vision`` (a ``FrozenVision``)
        is None on a pipeline stage that runs no tower: only the first stage does; the last stage of several
        gets what the towers computed with the activations (``pipeline_tuples``) and needs only labels."""

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

    # ---- accounting (definitions: BatchCounts). Defaults: one view, packed rows [B, S] ---------------

    def counts(self, batch: dict[str, torch.Tensor]) -> BatchCounts:
        """What the model computes for this loader batch (host tensors: no device sync)."""
        return BatchCounts(
            samples=self.count_samples(batch),
            tokens=self.count_tokens(batch),
            positions=self.count_positions(batch),
            head_tokens=self.count_head_tokens(batch),
            image_tokens=self.count_image_tokens(batch),
            attention_pairs=causal_pairs(self.segment_lengths(batch)),
            retrieval_tokens=self.count_retrieval_tokens(batch),
        )

    def count_samples(self, batch: dict[str, torch.Tensor]) -> int:
        """Samples in this batch: one per segment (a packed row holds several)."""
        return int(self.segment_lengths(batch).numel())

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real (non-padding) tokens processed for this batch, every view, for tokens/s."""
        return int((batch["segment_ids"] != 0).sum())

    def count_positions(self, batch: dict[str, torch.Tensor]) -> int:
        """Token positions the model computes for this batch (padding included)."""
        return int(batch["input_ids"].numel())

    def count_head_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real tokens the LM head runs on (padding excluded even where it runs on padding; default: all)."""
        return self.count_tokens(batch)

    def count_retrieval_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Real tokens the retrieval projection runs on (default: none, no retrieval head)."""
        return 0

    def count_image_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Image-prefix positions (the collator expands each placeholder to the prefix length)."""
        return int((batch["input_ids"] == int(self.cfg.model.vision.image_token_id)).sum())

    def segment_lengths(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Real length of every segment the model attends within (every view), int64 [n]."""
        return segment_lengths(batch["segment_ids"])
