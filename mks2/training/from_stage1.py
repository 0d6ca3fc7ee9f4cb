"""Continuing from a stage-1 checkpoint: what stage 2 (``model.init_from_stage1``) takes from it.

A stage-2 model gets
- its architecture (sizes, MVM placement and layers, vision kind) from the stage-1 run's saved config,
  so the two can never disagree (:func:`adopt_stage1_config`);
- the MVM experts and the visual mapping layer from the stage-1 checkpoint (the weights stage 1 trained);
- the frozen base (embeddings, attention, MLP, norms, head) from the stage-1 run's init: ``model.init_from``
  (the same HF Llama directory stage 1 started from, streamed by ``build_model``) or, when stage 1 started
  from a random initialisation (the demo), from the checkpoint itself, the only record of those weights.

Stage-1-only modules (the retrieval head) are not part of a stage-2 model and are dropped. Either parallel
mode's checkpoints are read (through ``mks2.checkpoint.open_consolidated``, tensor by tensor).

Who reads what:
- ZeRO-3 (``weight_gather`` given): only global rank 0 opens the checkpoint; every copy happens inside
  ``GatheredParameters(modifier_rank=0)`` (rank 0's values are what gets partitioned), so the other ranks
  never read a byte of it. Every rank walks the same parameter list in the same order, so the gathers match.
- pipeline (no ``weight_gather``): the model is stage-local (``mks2.model.build_model(..., keep=...)``:
  other stages' parameters stay on the meta device), and each rank reads only the tensors of its own
  stage's parameters. No tensor collective at all (NCCL would refuse the CPU tensors the model is built
  in); the ranks agree on errors through one object gather.
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from mks2.checkpoint import CheckpointError, find, open_consolidated, read_meta
from mks2.checkpoint.layout import dotted_get
from mks2.config import RunConfig, Stage, VisionKind
from mks2.training import distributed

log = logging.getLogger("mks2.training")

WeightGather = Callable[[list[nn.Parameter]], contextlib.AbstractContextManager]

ARCHITECTURE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "mvm.placement",
    "mvm.layers",
    "mvm.intermediate_size",
)
"""``model.*`` keys a stage-2 model takes from the stage-1 run (the checkpoint's tensors depend on them)."""

VISION_KEYS = ("kind", "path", "image_token_id", "image_size", "feature_layer")
"""``model.vision.*`` keys taken from the stage-1 run unless stage 2 is text-only (``vision.kind=none``)."""


@dataclass(frozen=True)
class Stage1Source:
    """A complete stage-1 checkpoint: ``save_dir``/``tag``, the run's resolved config and trainer state."""

    save_dir: Path
    tag: str
    config: dict[str, Any]
    trainer: dict[str, Any]

    @property
    def path(self) -> Path:
        return self.save_dir / self.tag

    @property
    def init_from(self) -> str | None:
        return self.config.get("model", {}).get("init_from")


def locate_stage1(path: str | Path) -> Stage1Source:
    """``model.init_from_stage1`` -> the checkpoint to read: a stage-1 ``train.save_dir`` (its newest complete
    checkpoint) or one ``step_XXXXXXXX`` directory in it. Raises CheckpointError saying what is wrong."""
    found = find(path, key="model.init_from_stage1")
    trainer, config = read_meta(found.path)
    stage = trainer.get("run", {}).get("stage") or config.get("model", {}).get("stage")
    if stage != Stage.MVM.value:
        raise CheckpointError(
            f"model.init_from_stage1: {found.path} was written by a stage {stage!r} run; stage 2 continues "
            f"from a stage-1 ('{Stage.MVM.value}') checkpoint"
        )
    return Stage1Source(save_dir=found.path.parent, tag=found.tag, config=config, trainer=trainer)


_ABSENT = object()


def _set(node: Any, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = getattr(node, part)
    old = getattr(node, leaf)
    if isinstance(old, enum.Enum) and value is not None:
        value = type(old)(value)  # saved configs hold enum values as strings
    setattr(node, leaf, value)


def _read(node: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        node = getattr(node, part)
    return getattr(node, "value", node)


def adopt_stage1_config(cfg: RunConfig, source: Stage1Source) -> list[str]:
    """Set ``cfg.model``'s architecture (and ``init_from`` when unset) from the stage-1 run, in place.

    Returns one note per value that changed, for the log. ``model.init_from`` set in both runs to
    different directories is allowed (a moved copy) but noted: the frozen base must be the same weights."""
    m = cfg.model
    saved = source.config.get("model", {})
    notes: list[str] = []

    def adopt(dotted: str) -> None:
        new = dotted_get(saved, dotted, _ABSENT)
        if new is _ABSENT:
            return  # a config written before this key existed: keep ours
        old = _read(m, dotted)
        if old != new:
            notes.append(f"model.{dotted}: {old!r} -> {new!r} (from the stage-1 run)")
            _set(m, dotted, new)

    for key in ARCHITECTURE_KEYS:
        adopt(key)
    if VisionKind(m.vision.kind) != VisionKind.NONE:
        if dotted_get(saved, "vision.kind", _ABSENT) in (_ABSENT, None, VisionKind.NONE.value):
            raise CheckpointError(
                f"model.vision.kind={VisionKind(m.vision.kind).value} but the stage-1 run {source.path} had no "
                "vision front-end"
            )
        for key in VISION_KEYS:
            adopt(f"vision.{key}")
    if source.init_from:
        if not m.init_from:
            m.init_from = source.init_from
            notes.append(f"model.init_from: None -> {source.init_from!r} (the stage-1 run's base model)")
        elif str(Path(m.init_from).expanduser()) != str(Path(source.init_from).expanduser()):
            notes.append(
                f"model.init_from={m.init_from!r} differs from the stage-1 run's {source.init_from!r}: the frozen "
                "base must be the same weights stage 1 trained with"
            )
    elif m.init_from:
        notes.append(
            f"model.init_from={m.init_from!r} is set but the stage-1 run started from a random base; the frozen "
            "base will be read from the stage-1 checkpoint instead"
        )
        m.init_from = None
    return notes


def wanted_from_stage1(name: str, *, base_from_checkpoint: bool) -> bool:
    """Whether stage-2 parameter ``name`` is read from the stage-1 checkpoint (see module docstring)."""
    if "lora_A" in name or "lora_B" in name or ".router." in name:
        return False  # stage-2 parameters: fresh
    if name.startswith("vision.") and not name.startswith("vision.mapping."):
        return False  # frozen towers: from model.vision.path, as in stage 1
    if ".mvm." in name or name.startswith("vision.mapping."):
        return True
    return base_from_checkpoint


def _outside_zero_init():
    """Suspend an active ``deepspeed.zero.Init`` (reading a checkpoint may build modules, which must not be
    partitioned); a no-op without DeepSpeed or outside zero.Init."""
    try:
        from deepspeed.runtime.zero import partition_parameters as pp
    except ImportError:  # pragma: no cover - deepspeed is a dependency of mks2.training
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def paused():
        active = pp.top_level_context is not None
        if active:
            pp.shutdown_init_context()
        try:
            yield
        finally:
            if active:
                pp.restore_init_context()

    return paused()


def open_stage1(source: Stage1Source) -> Any:
    """The stage-1 checkpoint opened for tensor-by-tensor reading under our parameter names
    (``mks2.checkpoint.open_consolidated``: either parallel mode's files). Close it when done."""
    with _outside_zero_init():  # it builds a shape-only model to check names against
        return open_consolidated(source.save_dir, tag=source.tag)


def _shape(p: nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))


def load_stage1_weights(
    model: nn.Module, source: Stage1Source, *, weight_gather: WeightGather | None = None
) -> list[str]:
    """Copy the stage-1 tensors a stage-2 ``model`` takes (see :func:`wanted_from_stage1`) into it.

    Parameters on the meta device belong to another pipeline stage and are neither read nor loaded. Every
    rank must call this (collectives). Returns the names loaded here. Raises CheckpointError on every rank
    when the checkpoint lacks a tensor or holds it with another shape (on any rank)."""
    rank = distributed.rank()
    reads = weight_gather is None or rank == 0  # ZeRO-3: rank 0 alone; pipeline: each rank its own stage
    base_from_ckpt = not source.init_from
    targets = [
        (n, p)
        for n, p in model.named_parameters()
        if wanted_from_stage1(n, base_from_checkpoint=base_from_ckpt) and not p.is_meta
    ]
    stored: Any = None
    problem: str | None = None
    if reads:
        try:
            stored = open_stage1(source)
            meta = stored.meta  # name -> shape/dtype; nothing read yet
            missing = [n for n, _ in targets if n not in meta]
            wrong = [f"{n} {tuple(meta[n].shape)} vs {_shape(p)}" for n, p in targets if n in meta and
                     tuple(meta[n].shape) != _shape(p)]  # fmt: skip
            if missing or wrong:
                parts = []
                if missing:
                    parts.append(f"missing {len(missing)} tensor(s) (first: {', '.join(missing[:5])})")
                if wrong:
                    parts.append(f"shape mismatch (checkpoint vs model) for {', '.join(wrong[:5])}")
                problem = f"stage-1 checkpoint {source.path} does not fit this stage-2 model: " + "; ".join(parts)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:  # CheckpointError is a ValueError
            problem = f"cannot read stage-1 checkpoint {source.path}: {exc}"
    # Every rank raises together (the first rank's problem), before any gather.
    first = next((p for p in distributed.all_gather_object(problem) if p is not None), None)
    if first is not None:
        if stored is not None:
            stored.close()
        raise CheckpointError(first)

    try:
        # One tensor at a time (a reader never holds more than one stage-1 tensor): under ZeRO-3 inside
        # GatheredParameters(modifier_rank=0), which partitions rank 0's values on exit.
        for name, param in tqdm(targets, desc="stage-1 weights", disable=rank != 0, leave=False):
            ctx = weight_gather([param]) if weight_gather is not None else contextlib.nullcontext()
            with ctx, torch.no_grad():
                if reads:
                    with _outside_zero_init():
                        tensor = stored.get(name)
                    param.data.copy_(tensor.to(device=param.device, dtype=param.dtype))
                    del tensor
    finally:
        if stored is not None:
            stored.close()
    if rank == 0:
        log.info(
            "loaded %d tensors from stage-1 checkpoint %s (%s)",
            len(targets),
            source.path,
            "MVM, mapping and the frozen base" if base_from_ckpt else f"MVM and mapping; base from {source.init_from}",
        )
    return [n for n, _ in targets]
