"""Batch arithmetic of a run on a given number of ranks: pipeline stages, data-parallel size,
gradient accumulation, and the check that ``train.global_batch_size`` splits evenly over them.

``train.global_batch_size`` (samples per optimizer step) = ``train.micro_batch_size`` (samples per rank
per forward pass) x data-parallel size x gradient-accumulation steps, where the data-parallel size is
the world size divided by the pipeline stages (1 in zero3 mode).
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
    return cfg.train.global_batch_size // (cfg.train.micro_batch_size * data_parallel_size)


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
    if t.global_batch_size % per_step:
        p.append(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of micro_batch_size x "
            f"data-parallel size = {t.micro_batch_size} x {dp} = {per_step}"
        )
    return p
