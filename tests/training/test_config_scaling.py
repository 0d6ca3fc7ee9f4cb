"""The shipped Llama-2 configs run unchanged on 8, 64 and 256 GPUs: each is read by the real config loader
and passes the batch check at every world size, in zero3 mode (as shipped, both ``parallel.frozen_base``
choices) and in pipeline mode, and the DeepSpeed config built from it satisfies DeepSpeed's own identity
train_batch_size = micro x accumulation x data-parallel size. In-process, no launch."""

from __future__ import annotations

from pathlib import Path

import pytest

from mks2.config import load_config
from mks2.training.batch import (
    check_world_size,
    data_parallel_size,
    global_batch_size,
    grad_accumulation_steps,
    resolve_global_batch,
)
from mks2.training.ds_config import build_ds_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("llama2_*.yaml"))
MODES = {
    "zero3-partition": ["parallel.frozen_base=partition"],
    "zero3-replicate": ["parallel.frozen_base=replicate"],
    "pipeline-4": ["parallel.mode=pipeline", "parallel.pipeline_stages=4"],
}


def test_all_four_shipped_configs_are_checked():
    assert [p.stem for p in CONFIGS] == [
        "llama2_13b_stage1", "llama2_13b_stage2", "llama2_7b_stage1", "llama2_7b_stage2"
    ]  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_runs_on_8_to_256_gpus(path, mode):
    eight = None
    for world in (8, 64, 256):
        cfg = load_config(path, MODES[mode])
        assert check_world_size(cfg, world) == [], (path.name, mode, world)
        dp = data_parallel_size(cfg, world)
        accum = grad_accumulation_steps(cfg, dp)
        assert accum == cfg.train.grad_accumulation_steps >= 1  # per-GPU work is what the config states
        n = global_batch_size(cfg, dp)
        assert n == cfg.train.micro_batch_size * dp * accum
        ds, _ = build_ds_config(cfg, data_parallel_size=dp, use_torch_adam=True)
        assert ds["train_batch_size"] == ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * dp
        assert resolve_global_batch(cfg, world) == n == cfg.train.global_batch_size
        assert check_world_size(cfg, world) == []  # the resolved config (both fields set) still agrees
        eight = eight or n
    if mode != "pipeline-4":  # the paper's global batch on one 8-GPU node
        assert eight == {"stage1": 256, "stage2": 128}[path.stem.split("_")[-1]]


def test_fixed_global_batch_still_checked_and_named():
    path = next(p for p in CONFIGS if p.stem == "llama2_7b_stage1")
    fixed = ["train.global_batch_size=256", "train.grad_accumulation_steps=null"]
    cfg = load_config(path, fixed)
    assert check_world_size(cfg, 16) == [] and grad_accumulation_steps(cfg, 16) == 1
    (problem,) = check_world_size(cfg, 32)
    assert "train.global_batch_size (256) must be a multiple of" in problem and "16 x 32 = 512" in problem
    both = load_config(path, ["train.global_batch_size=256"])  # accumulation 2 from the file: 512 on 16 GPUs
    (problem,) = check_world_size(both, 16)
    assert "disagrees with" in problem and "16 x 16 x 2 = 512" in problem and "set one of the two to null" in problem
