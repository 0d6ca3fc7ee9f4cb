"""Engine construction: the ONE place that wraps the model with DeepSpeed.

``build_engine(cfg, task)`` returns a :class:`TrainingEngine` for either parallel mode:

- ``zero3``: the model is built under ``deepspeed.zero.Init`` (parameters partitioned as each module
  is constructed; HF weights streamed in through ``GatheredParameters``), wrapped in the stage's
  objective module, and handed to ``deepspeed.initialize`` with only the trainable parameters.
  Only rank 0 reads the HF weights (the others walk the same gathers reading headers only). The frozen
  vision towers are NOT in that model (``vision_towers=False``: its front-end holds the trainable
  ``mapping`` alone, checked after ``deepspeed.initialize``): they are read once per rank into the
  replicated ``FrozenVision`` built first, which runs them, and rank 0 writes them from it into every
  checkpoint (``mks2.checkpoint.save_towers``), so checkpoints of both modes still hold every parameter.
- ``pipeline``: the model is built stage-local (``build_model(keep=...)``): each rank materialises and
  reads only its pipeline stage's pieces, the others stay on the meta device; the random init of what it
  keeps equals a full build's (same seed, the RNG advances as in a full build), so initialisation is
  identical to zero3 mode. The stage's LayerSpecs (``task.pipeline``: the layer list and stage split of
  ``mks2.model.pipeline_layout``) then build only this stage's layers; ZeRO-1 across the data-parallel
  replicas. The vision towers are built, read and run on the first stage only (its own ``vision``
  module); what a later stage needs from them (stage 1's pooled image embedding, the retrieval target)
  travels with the activations (``task.pipeline_tuples``).

In both modes the frozen vision towers run OUT of the engine's forward (``FrozenVision``), and
the optimizer (AdamW; ``torch.optim.AdamW`` on CPU so nothing is JIT-compiled) and our own
warmup + cosine LambdaLR are built by DeepSpeed from the filled-in config (``ds_config.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mks2.checkpoint import install_safe_checkpoint_engine
from mks2.config import Offload, ParallelMode, RunConfig, VisionKind, to_dict
from mks2.model import apply_config_from_hf
from mks2.model.dtypes import torch_dtype
from mks2.model.pipeline_layout import PipelineLayout
from mks2.training import distributed
from mks2.training.batch import data_parallel_size, pipeline_stages
from mks2.training.ds_config import build_ds_config, zero_stage
from mks2.training.flops import FlopsModel, describe, flops_model
from mks2.training.frozen_base import check_frozen_base
from mks2.training.frozen_vision import FrozenVision, check_towers_outside
from mks2.training.schedule import build_scheduler
from mks2.training.task import StageTask

log = logging.getLogger("mks2.training")


@dataclass
class TrainingEngine:
    """A built DeepSpeed engine plus what the loop needs to drive it."""

    engine: Any  # deepspeed DeepSpeedEngine (zero3) or PipelineEngine (pipeline)
    mode: ParallelMode
    device: torch.device
    vision: FrozenVision | None  # None on pipeline stages that run no tower (see _stage_vision)
    dp_rank: int
    dp_size: int
    dp_group: Any
    pp_stage: int = 0
    pp_stages: int = 1
    ds_config: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    resolved_config: dict[str, Any] = field(default_factory=dict)
    llm_params: int = 0  # all LLM parameters (vision towers excluded)
    trainable_params: int = 0
    flops: FlopsModel | None = None  # FLOPs per real token / attention pair / sample (mks2.training.flops)
    saves_towers: bool = False
    """zero3 mode with vision: the frozen towers are outside the engine, so each checkpoint gets them from
    ``vision`` (rank 0, ``mks2.checkpoint.save_towers``); pipeline layer files hold them already."""

    @property
    def is_first_stage(self) -> bool:
        return self.pp_stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_stage == self.pp_stages - 1

    @property
    def gradient_accumulation_steps(self) -> int:
        return int(self.ds_config["gradient_accumulation_steps"])


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters only; no weight decay on 1-d tensors (norm scales, biases, logit scale).
    Without weight decay: ONE group. ZeRO-1 all-reduces the gradient norm once per group across the
    pipeline stages, so stages with different group counts (stage 2: no 1-d trainable tensor on the last
    stage) would wait on each other forever."""
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.dim() < 2 else decay).append(p)
    if weight_decay == 0:
        return [{"params": decay + no_decay, "weight_decay": 0.0}] if decay or no_decay else []
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _same_group_count_on_every_stage(groups: list[dict[str, Any]], weight_decay: float) -> list[dict[str, Any]]:
    """ZeRO-1 all-reduces the gradient norm once per parameter group over all pipeline stages: a stage
    with a different number of groups (e.g. a middle stage with no 1-d trainable tensor, so no
    no-decay group) would hang the first step. If the stages disagree, every stage uses one group,
    weight decay on all its trainable tensors, and rank 0 says so."""
    counts = torch.tensor([len(groups), -len(groups)], dtype=torch.float64, device=_device())  # NCCL: on the GPU
    distributed.all_reduce(counts, op=distributed.ReduceOp.MAX)  # [max, -min]
    if counts[0] == -counts[1]:
        return groups
    if distributed.rank() == 0:
        log.warning(
            "pipeline stages hold different kinds of trainable tensors: weight decay %.3g is applied to all of "
            "them, 1-d ones included (one optimizer group per stage)",
            weight_decay,
        )
    return [{"params": [p for g in groups for p in g["params"]], "weight_decay": weight_decay}]


def _numel(p: nn.Parameter) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _count(model: nn.Module) -> tuple[int, int]:
    """(LLM parameters incl. frozen, trainable parameters); vision towers excluded from the first."""
    total = trainable = 0
    for name, p in model.named_parameters():
        if name.startswith("vision.") and not name.startswith("vision.mapping."):
            continue
        total += _numel(p)
        trainable += _numel(p) if p.requires_grad else 0
    return total, trainable


def _device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def build_engine(cfg: RunConfig, task: StageTask) -> TrainingEngine:
    """Build the model, the frozen vision side and the DeepSpeed engine for ``cfg.parallel.mode``.
    Expects ``distributed.init_distributed()`` and the world-size checks to have run."""
    from deepspeed.accelerator import get_accelerator

    world = distributed.world_size()
    dp_size = data_parallel_size(cfg, world)
    on_cpu = get_accelerator().device_name() == "cpu"
    ds_config, notes = build_ds_config(
        cfg, data_parallel_size=dp_size, use_torch_adam=on_cpu and cfg.parallel.offload == Offload.NONE
    )
    if distributed.rank() == 0:
        for note in notes:
            log.warning(note)
    dtype = torch_dtype(cfg.train.precision)
    torch.manual_seed(cfg.train.seed)  # identical initialisation in both modes and on every rank
    if cfg.parallel.mode == ParallelMode.PIPELINE:
        return _build_pipeline(cfg, task, ds_config, dtype, pipeline_stages(cfg))
    return _build_zero3(cfg, task, ds_config, dtype)


def _preimport_for_zero_init() -> None:
    """zero.Init patches tensor construction (``torch.Tensor.__new__``) while it is active; a module
    imported for the first time inside it (transformers' vision models import torch._dynamo) then
    fails at import. Import them before entering."""
    import torch._dynamo  # noqa: F401
    from transformers import Blip2QFormerModel, Blip2VisionModel, CLIPVisionModel  # noqa: F401


def _build_zero3(cfg: RunConfig, task: StageTask, ds_config: dict, dtype: torch.dtype) -> TrainingEngine:
    import deepspeed

    from mks2.model import parameter_summary

    def gather(params):
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    _preimport_for_zero_init()
    device = _device()
    # ZeRO-3: rank 0 alone reads the HF weights (GatheredParameters(modifier_rank=0) keeps its values). With
    # zero.Init disabled (parallel.zero_stage < 3) nothing is partitioned and every rank loads its own copy.
    reader = distributed.rank() == 0 or zero_stage(cfg) != 3
    # The frozen towers: one replicated copy per rank, read once here, outside zero.Init and outside the
    # engine (fork_rng inside: the model's init is unchanged). The model built under zero.Init holds only
    # the trainable mapping of its vision front-end (vision_towers=False): no tower is partitioned, gathered
    # at save time or listed in ZeRO's parameter groups; checkpoints get the towers from the replica.
    has_vision = VisionKind(cfg.model.vision.kind) != VisionKind.NONE
    vision = FrozenVision.build(cfg.model, device, dtype) if has_vision else None
    # dtype=None: zero.Init then takes it from the config's bf16/fp16 flags (set from train.precision).
    # Passing a dtype explicitly hits an operator-precedence slip in DeepSpeed 0.19 that picks bf16 on CPU.
    with deepspeed.zero.Init(config_dict_or_path=ds_config, enabled=zero_stage(cfg) == 3, dtype=None):
        model = task.build_model(cfg, weight_gather=gather, read_weights=reader, vision_towers=False)
    model.set_activation_checkpointing(bool(cfg.train.activation_checkpointing))
    summary = parameter_summary(model)
    if vision is not None:
        summary += f"\nfrozen vision towers outside the engine (replicated on every rank): {vision.tower_numel:,}"
    llm_params, trainable = _count(model)
    flops = flops_model(model, recompute=bool(cfg.train.activation_checkpointing))
    summary += "\n" + describe(flops)
    resolved = to_dict(cfg)  # after build_model: architecture fields read from model.init_from

    objective = task.objective(model)
    for param in task.external_parameters(model):
        deepspeed.zero.register_external_parameter(objective, param)
    engine, _, _, _ = deepspeed.initialize(
        model=objective,
        model_parameters=_param_groups(objective, cfg.train.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.train),
        dist_init_required=False,
    )
    install_safe_checkpoint_engine(engine)  # every checkpoint file DeepSpeed loads: weights only
    check_towers_outside(engine.module)  # raises if a tower parameter is in the engine
    frozen_line = check_frozen_base(engine.module, cfg.parallel.frozen_base)  # raises if replicate did not hold
    if distributed.rank() == 0:
        log.info("%s", frozen_line)
    dp_group = dist.group.WORLD  # never None: None would mean "the world" to torch.distributed anyway
    task.dp_group = dp_group
    return TrainingEngine(
        engine=engine,
        mode=ParallelMode.ZERO3,
        device=device,
        vision=vision,
        dp_rank=distributed.rank(),
        dp_size=distributed.world_size(),
        dp_group=dp_group,
        ds_config=ds_config,
        summary=summary,
        resolved_config=resolved,
        llm_params=llm_params,
        trainable_params=trainable,
        flops=flops,
        saves_towers=vision is not None,
    )


def _pipeline_stage(stages: int, dp_size: int) -> int:
    """This rank's pipeline stage, as ``deepspeed.pipe.PipelineModule`` will place it (same topology)."""
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

    return PipeDataParallelTopology(num_pp=stages, num_dp=dp_size).get_coord(distributed.rank()).pipe


def _stage_pieces(layout: PipelineLayout, stage: int, stages: int) -> set[str]:
    """Module paths (``model.layers.3``, ``vision``...) of the pipeline layers stage ``stage`` holds."""
    return {path for index in layout.stage_layers(stage, stages) for _, path in layout.layer(index).modules}


def _stage_vision(model: nn.Module, stage: int, device: torch.device, dtype: torch.dtype) -> FrozenVision | None:
    """The frozen towers this pipeline stage runs: the first stage's own (its ``vision`` module, whose
    trainable mapping is in the engine); None on every other stage. What the towers compute for the last
    stage (stage 1's pooled image embedding, the retrieval target) travels with the activations."""
    if model.vision is None or stage != 0:
        return None
    return FrozenVision(model.vision, device, dtype)


def _build_pipeline(
    cfg: RunConfig, task: StageTask, ds_config: dict, dtype: torch.dtype, stages: int
) -> TrainingEngine:
    import deepspeed

    from mks2.model import parameter_summary
    from mks2.training.pipeline_module import LayoutPipelineModule

    if cfg.model.tie_word_embeddings:
        from mks2.config import ConfigError

        raise ConfigError(["model.tie_word_embeddings=true is not supported with parallel.mode=pipeline"])
    if cfg.model.init_from:  # the layout needs the architecture (build_model applies it again: idempotent)
        apply_config_from_hf(cfg, cfg.model.init_from)
    stage = _pipeline_stage(stages, data_parallel_size(cfg, distributed.world_size()))
    keep = _stage_pieces(PipelineLayout(num_layers=cfg.model.num_layers), stage, stages)
    model = task.build_model(cfg, keep=keep)  # this stage's pieces only; the rest on the meta device
    summary = parameter_summary(model)
    llm_params, trainable = _count(model)  # meta parameters count by shape: the whole model's figures
    flops = flops_model(model, recompute=bool(cfg.train.activation_checkpointing))
    summary += "\n" + describe(flops)
    resolved = to_dict(cfg)
    device = _device()
    vision = _stage_vision(model, stage, device, dtype)
    spec = task.pipeline(model)
    interval = int(ds_config.get("pipeline", {}).get("activation_checkpoint_interval", 0))
    module = LayoutPipelineModule(  # stage split and checkpointed layers: mks2.model.pipeline_layout
        layout=spec.layout,
        layers=spec.layers,
        num_stages=stages,
        loss_fn=spec.loss_fn,
        activation_checkpoint_interval=interval,
        dynamic_shape=True,
    )
    spec.release()  # other stages' layers are freed once ``model`` goes out of scope
    del model
    groups = _param_groups(module, cfg.train.weight_decay)
    if not groups:
        from mks2.config import ConfigError

        raise ConfigError(
            [f"pipeline stage {module.stage_id} holds no trainable parameter; use fewer parallel.pipeline_stages"]
        )
    groups = _same_group_count_on_every_stage(groups, cfg.train.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=module,
        model_parameters=groups,
        config=ds_config,
        lr_scheduler=lambda opt: build_scheduler(opt, cfg.train),
        dist_init_required=False,
    )
    install_safe_checkpoint_engine(engine)  # every checkpoint file DeepSpeed loads: weights only
    grid = engine.grid
    dp_group = grid.get_data_parallel_group()  # a size-1 group when there is one replica: gathers are no-ops
    task.dp_group = dp_group
    return TrainingEngine(
        engine=engine,
        mode=ParallelMode.PIPELINE,
        device=device,
        vision=vision,
        dp_rank=grid.get_data_parallel_rank(),
        dp_size=grid.get_data_parallel_world_size(),
        dp_group=dp_group,
        pp_stage=engine.stage_id,
        pp_stages=engine.num_stages,
        ds_config=ds_config,
        summary=summary,
        resolved_config=resolved,
        llm_params=llm_params,
        trainable_params=trainable,
        flops=flops,
    )
