"""The DeepSpeed config ``build_ds_config`` writes for the parallel choices: ``frozen_base`` picks ZeRO-3 or
ZeRO-2 (and its template), bf16 ZeRO-1 pipeline runs accumulate gradients in fp32, and the ZeRO-3
templates gather a whole 13B decoder layer per prefetch. In-process."""

from __future__ import annotations

import pytest

from mks2.config import ConfigError
from mks2.training.ds_config import build_ds_config, template_path
from tests.tiny import run_config


def _ds(*overrides: str) -> dict:
    ds, _ = build_ds_config(run_config("model.stage=base", *overrides), data_parallel_size=2, use_torch_adam=True)
    return ds


def test_frozen_base_picks_the_zero_stage_and_template():
    part = run_config("model.stage=base")
    assert template_path(part).name == "zero3.json" and _ds()["zero_optimization"]["stage"] == 3
    rep = run_config("model.stage=base", "parallel.frozen_base=replicate")
    assert template_path(rep).name == "zero2.json"
    ds, notes = build_ds_config(rep, data_parallel_size=2, use_torch_adam=True)
    assert ds["zero_optimization"]["stage"] == 2 and notes == []  # its own template: nothing overwritten
    assert not any(k.startswith("stage3_") for k in ds["zero_optimization"])
    pipe = _ds("parallel.mode=pipeline", "parallel.pipeline_stages=2", "parallel.frozen_base=replicate")
    assert pipe["zero_optimization"]["stage"] == 1  # pipeline mode: ZeRO-1 whatever frozen_base says
    with pytest.raises(ConfigError, match="frozen_base=replicate keeps the frozen base out of ZeRO-3"):
        run_config("model.stage=base", "parallel.frozen_base=replicate", "parallel.zero_stage=3")
    with pytest.raises(ConfigError, match="needs parallel.frozen_base=partition"):
        run_config("model.stage=base", "parallel.frozen_base=replicate", "parallel.offload=cpu")


def test_bf16_pipeline_accumulates_gradients_in_fp32():
    pipe = ["parallel.mode=pipeline", "parallel.pipeline_stages=2"]
    assert _ds(*pipe, "train.precision=bf16")["data_types"] == {"grad_accum_dtype": "fp32"}
    assert "data_types" not in _ds(*pipe, "train.precision=fp32")
    assert "data_types" not in _ds(*pipe, "train.precision=bf16", "parallel.zero_stage=0")  # no fp32 path there
    assert "data_types" not in _ds("train.precision=bf16")  # ZeRO-3 keeps its own fp32 gradient partitions


def test_zero3_prefetch_holds_a_13b_layer():
    # One Llama-2-13B decoder layer with its MVM expert: 4 x 5120^2 attention + 2 x 3 x 5120 x 13824 MLP/MVM.
    layer = 4 * 5120**2 + 2 * 3 * 5120 * 13824
    zero = _ds()["zero_optimization"]
    assert zero["stage3_prefetch_bucket_size"] >= layer
    assert zero["stage3_max_live_parameters"] >= 2 * layer  # the running layer and the prefetched one
    # LoRA factors (16 x 13824) and norm scales persist (no gathers); no matrix of the base does.
    assert 16 * 13824 <= zero["stage3_param_persistence_threshold"] < 4096**2
