"""Batch arithmetic of a run on a given number of ranks: pipeline stages, data-parallel size,
gradient accumulation, the global batch, and the check that they fit together.

The global batch (samples per optimizer step) = ``train.micro_batch_size`` (samples per rank per forward
pass) x data-parallel size x gradient-accumulation steps, where the data-parallel size is the world size
divided by the pipeline stages (1 in zero3 mode). A config fixes one side of that product:

- ``train.global_batch_size`` set, ``train.grad_accumulation_steps`` null: the global batch is fixed and
  the accumulation is derived, so the global batch must be a multiple of micro x dp (a fixed 256 stops
  at 256 / micro data-parallel ranks);
- ``train.grad_accumulation_steps`` set, ``train.global_batch_size`` null: the per-GPU work is fixed and
  the global batch grows with the world size (the shipped Llama-2 configs: 8 to 256 GPUs unchanged);
- both set: they must agree at this world size (a resolved config saved in a checkpoint has both);
- neither: one micro-batch per rank per step.

``resolve_global_batch`` writes the resulting global batch into the config once the world size is known,
so everything after it (DeepSpeed's ``train_batch_size``, the data summary, the saved config) reads one
number.
"""

from __future__ import annotations

from mks2.config import ParallelMode, RunConfig


def pipeline_stages(cfg: RunConfig) -> int:
    """Pipeline stages the run uses: ``parallel.pipeline_stages`` in pipeline mode, else 1."""
    return cfg.parallel.pipeline_stages if cfg.parallel.mode == ParallelMode.PIPELINE else 1


def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    """Model replicas over ``world_size`` ranks (assumes ``check_world_size`` found no problem)."""
    return world_size // pipeline_stages(cfg)


def grad_accumulation_steps(cfg: RunConfig, data_parallel_size: int) -> int:
    """Micro-batches each rank runs per optimizer step."""
    t = cfg.train
    if t.grad_accumulation_steps is not None:
        return int(t.grad_accumulation_steps)
    if t.global_batch_size is None:
        return 1
    return int(t.global_batch_size) // (t.micro_batch_size * data_parallel_size)


def global_batch_size(cfg: RunConfig, data_parallel_size: int) -> int:
    """Samples per optimizer step over all data-parallel ranks at this data-parallel size."""
    t = cfg.train
    if t.global_batch_size is not None and t.grad_accumulation_steps is None:
        return int(t.global_batch_size)
    return t.micro_batch_size * data_parallel_size * grad_accumulation_steps(cfg, data_parallel_size)


def check_world_size(cfg: RunConfig, world_size: int) -> list[str]:
    """Problems with the batch arithmetic and pipeline split for a given number of ranks."""
    p: list[str] = []
    t = cfg.train
    stages = pipeline_stages(cfg)
    if world_size % stages:
        p.append(f"world size {world_size} is not divisible by parallel.pipeline_stages ({stages})")
        return p
    dp = data_parallel_size(cfg, world_size)
    per_step = t.micro_batch_size * dp
    fixed = t.global_batch_size
    if fixed is None:
        return p
    if t.grad_accumulation_steps is not None:
        derived = per_step * int(t.grad_accumulation_steps)
        if derived != fixed:
            p.append(
                f"train.global_batch_size ({fixed}) disagrees with micro_batch_size x data-parallel size x "
                f"grad_accumulation_steps = {t.micro_batch_size} x {dp} x {t.grad_accumulation_steps} = {derived}"
                " on this world size: set one of the two to null"
            )
    elif fixed % per_step:
        fits = _what_fits(fixed, t.micro_batch_size, dp, stages)
        p.append(
            f"train.global_batch_size ({fixed}) must be a multiple of micro_batch_size x "
            f"data-parallel size = {t.micro_batch_size} x {dp} = {per_step}: {fits}"
            " (or set train.global_batch_size=null and train.grad_accumulation_steps to let the global batch scale "
            "with the world size)"
        )
    return p


def _what_fits(global_batch: int, micro: int, dp: int, stages: int) -> str:
    """Values that keep ``global_batch`` (a resume on another number of GPUs must keep it: the rows per step)."""
    micros = [b for b in range(1, global_batch // dp + 1) if global_batch % (b * dp) == 0]
    worlds = [d * stages for d in range(1, global_batch // micro + 1) if global_batch % (micro * d) == 0]
    on_this = (
        f"on {dp} data-parallel ranks train.micro_batch_size {micros} fits"
        if micros
        else f"{dp} data-parallel ranks cannot split {global_batch} samples"
    )
    return f"{on_this}; with micro_batch_size {micro} the world sizes {worlds[:8]} do"


def resolve_global_batch(cfg: RunConfig, world_size: int) -> int:
    """Write the global batch of this world size into ``cfg.train.global_batch_size`` (after
    ``check_world_size`` found no problem) and return it. Idempotent; every rank computes the same."""
    n = global_batch_size(cfg, data_parallel_size(cfg, world_size))
    cfg.train.global_batch_size = n
    return n
