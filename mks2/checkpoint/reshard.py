"""Resume a ZeRO checkpoint on another data-parallel size: put its optimizer state into a built engine.

DeepSpeed 0.19.8 refuses ``load_checkpoint`` when the data-parallel size changed (``ZeRORuntimeException``
in ``_load_zero_checkpoint``; ``elastic_checkpoint`` is gone for ZeRO-3). Its answer, the universal
checkpoint, was not used, on purpose:

- ``ds_to_universal`` is an offline conversion that writes a second copy of the checkpoint (one directory
  and one ``.pt`` per parameter and state key) through worker pools that unpickle with
  ``weights_only=False``; the universal loaders are switched on by a config flag fixed when the engine is
  built (``checkpoint.load_universal``) and read every file with ``weights_only=False`` again;
- its ZeRO-3 loader copies the first param group's hyper-parameters onto every group
  (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), which loses our no-weight-decay group.

Our trainable state is small (MVM experts, LoRA, routers, the mapping), so re-sharding it in place is
simple and exact: for each trainable parameter of the NEW engine, the whole fp32 master weight and each
partitioned optimizer state (``exp_avg``, ``exp_avg_sq``) are assembled from the old ranks' shards
(:class:`OptimizerShards`, weights-only, memory-mapped); this rank keeps its slice of the new
partitioning (ZeRO-1/2: DeepSpeed's ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state``;
ZeRO-3: the same arithmetic in ``_zero3_set``, which also handles a padded last partition).
Per-group values (``step``, lr and the other hyper-parameters) are copied from the saved group that
holds the same parameters, and the loss scaler from rank 0's file; the trainable model weights
are then refreshed from the masters (ZeRO-3: its partitions; ZeRO-1/2: ``update_lp_params``). Frozen
tensors are not in the optimizer: in zero3 mode (ZeRO-3, or ZeRO-2 with a replicated frozen base) they
come from the model build (``model.init_from`` / ``model.init_from_stage1``), exactly as in DeepSpeed's
own same-size resume, which restores none of them; in pipeline mode DeepSpeed's loader reads every layer
file (they do not depend on the data-parallel size).

Cost per rank: every trainable tensor is read whole (x3 for Adam) from the shared filesystem, one tensor
at a time in memory; the only collectives are ZeRO-3's re-gather of its persistent (small) parameters and
ZeRO-1/2's all-gather of the refreshed weights (both over the data-parallel group, on the device).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mks2.checkpoint.errors import CheckpointError
from mks2.checkpoint.optim_shards import FP32, OptimizerShards


def _flat_groups(opt: Any) -> list[tuple[list[torch.nn.Parameter], torch.Tensor, dict[str, Any]]]:
    """(model parameters, this rank's fp32 master partition of them [partition numel], torch param group
    that steps it) for each flat buffer of DeepSpeed's ZeRO optimizer ``opt``. ZeRO-3 keeps one torch param
    group per model param group and steps its sub-groups' buffers through it one at a time."""
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3
        torch_groups = [opt.optimizer.param_groups[opt.sub_group_to_group_id[i]] for i in range(len(opt.fp16_groups))]
        return list(zip(opt.fp16_groups, opt.fp32_partitioned_groups_flat, torch_groups))
    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return list(zip(opt.bit16_groups, opt.single_partition_of_fp32_groups, opt.optimizer.param_groups))
    if hasattr(opt, "fp32_groups_flat_partition"):  # bf16 optimizer (bf16 with ZeRO-1)
        return list(zip(opt.bf16_groups, opt.fp32_groups_flat_partition, opt.optimizer.param_groups))
    raise CheckpointError(
        f"a resume with another data-parallel size is not supported with DeepSpeed optimizer {type(opt).__name__}"
    )


def _zero3_set(opt: Any, param: torch.nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """This rank's slice of ``value`` (the whole flat tensor, [ds_numel]) into ZeRO-3's fp32 master
    (``key`` None) or optimizer-state partition of ``param``. DeepSpeed's ``set_full_hp_param`` does the
    same but narrows past the end on the rank holding a padded last partition (numel not divisible by
    the data-parallel size: a [1] logit scale on 2 ranks), so the padding is handled here."""
    partition, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    start = partition.numel() * opt._get_param_partition_rank(param)
    valid = max(0, min(partition.numel(), value.numel() - start))
    partition.data.zero_()
    partition.data[:valid].copy_(value.flatten()[start : start + valid])


def _zero3_partitions_from_fp32(opt: Any) -> None:
    """ZeRO-3: copy the fp32 master partitions into the model's (bf16/fp16/fp32) parameter partitions."""
    for sub_group in range(len(opt.fp16_groups)):
        if opt.fp16_partitioned_groups_flat[sub_group] is None:
            raise CheckpointError("a resume with another data-parallel size does not support parallel.offload=nvme")
        opt._reassign_or_swap_out_partitioned_parameters(sub_group)


def load_resharded(engine: Any, ckpt_dir: str | Path, *, mp_rank: int = 0, module_loaded: bool = False) -> int:
    """Load the optimizer state of checkpoint ``ckpt_dir`` into the built DeepSpeed ``engine``, whatever
    data-parallel size wrote it. ``mp_rank``: this rank's pipeline stage (0 in zero3 mode).
    ``module_loaded``: the caller already ran ``engine.load_checkpoint(..., load_optimizer_states=False)``
    (pipeline mode: layer files, LR scheduler, counters); otherwise (zero3 mode, ZeRO-3 or ZeRO-2 with a
    replicated frozen base) the trainable model weights are refreshed from the restored fp32 masters and
    the LR scheduler and engine counters are read from rank 0's model-state file.
    Returns the number of parameters restored."""
    src = OptimizerShards(ckpt_dir, mp_rank)
    opt = engine.optimizer
    names = {id(p): n for n, p in engine.module.named_parameters()}
    flats = _flat_groups(opt)
    now = [names[id(p)] for params, _, _ in flats for p in params]
    missing, extra = sorted(set(src.names) - set(now)), sorted(set(now) - set(src.names))
    if missing or extra:
        raise CheckpointError(
            f"{ckpt_dir}: the checkpoint's trainable tensors differ from this run's (only in the checkpoint: "
            f"{missing[:3]}, only in this run: {extra[:3]})"
        )
    zero3 = src.zero3
    if zero3:
        opt.checkpoint_event_prologue()  # partition every parameter (what engine.load_checkpoint does first)
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    for params, flat, group in flats:
        if not params:
            continue
        saved = src.group_of(names[id(params[0])])
        keys = src.partitioned_keys(saved)
        state = opt.optimizer.state[flat]  # empty before the first step: created here
        for key in keys:
            state[key] = torch.zeros_like(flat)
        for key, value in src.scalar_state(saved).items():
            state[key] = value.clone() if torch.is_tensor(value) else value
        group.update(src.param_group(saved))
        for p in params:
            name = names[id(p)]
            if src.group_of(name) != saved:
                raise CheckpointError(f"{ckpt_dir}: parameter {name} is in another optimizer group than in this run")
            numel = int(getattr(p, "ds_numel", p.numel()))
            if src.numel(name) != numel:
                raise CheckpointError(f"{ckpt_dir}: {name} has {src.numel(name)} elements, this run's {numel}")
            if not zero3 and p._hp_mapping is not None:  # ZeRO-1/2: point the fragment views at the new state
                p._hp_mapping.set_optim_state_fragment(flat, state)
            for key in [None, *keys]:
                value = src.full(name, FP32 if key is None else key)
                if zero3:
                    _zero3_set(opt, p, value, key)
                elif key is None:
                    safe_set_full_fp32_param(p, value)
                else:
                    safe_set_full_optimizer_state(p, value, key)
    for key, value in src.scaler_state().items():
        setattr(opt, key, value)
    if zero3:
        _zero3_partitions_from_fp32(opt)
        opt.checkpoint_event_epilogue()  # re-gathers the persistent parameters from their new partitions
    elif not module_loaded:
        opt.update_lp_params()  # ZeRO-1/2: masters -> this rank's bit16 slice, all-gathered over the ranks
    if not module_loaded:
        _restore_engine_counters(engine, src.model_states)
    return len(now)


def _restore_engine_counters(engine: Any, model_states: dict[str, Any]) -> None:
    """What DeepSpeed's own loader restores from the model-state file besides tensors (ZeRO-3 mode)."""
    if engine.lr_scheduler is not None and model_states.get("lr_scheduler") is not None:
        engine.lr_scheduler.load_state_dict(model_states["lr_scheduler"])
    engine.global_steps = int(model_states["global_steps"])
    engine.global_samples = int(model_states.get("global_samples", engine.global_steps * engine.train_batch_size()))
    engine.skipped_steps = int(model_states["skipped_steps"])
