"""Session-wide stage-1 checkpoints (tiny, 2 ranks, both parallel modes) that the stage-2 tests continue
from, and a reference stage-2 run. Each costs ~20 s on 2 cores; built only when a test asks."""

from __future__ import annotations

import pytest

from tests.stage2.stage2_launch import PIPELINE, STAGE1, STAGE1_ARGS, run, run_stage2
from tests.training.launchers import metrics, tail

STAGE2_RESUME = ["train.max_steps=8", "train.save_interval=3", "train.keep_last=5"]


def _stage1(tmp_path_factory, name: str, extra: list[str], demo_cache) -> dict:
    save_dir = tmp_path_factory.mktemp(name) / "run"
    args = [*STAGE1_ARGS, *extra, f"train.save_dir={save_dir}", f"data.cache_dir={demo_cache}"]
    result = run(STAGE1, "deepspeed", 2, args)
    assert result.returncode == 0, tail(result)
    return {"save_dir": save_dir, "cache": demo_cache}


@pytest.fixture(scope="session")
def stage1_zero3(tmp_path_factory, demo_cache) -> dict:
    """A 4-step stage-1 run (zero3, 2 ranks) with its final checkpoint."""
    return _stage1(tmp_path_factory, "s1_zero3", [], demo_cache)


@pytest.fixture(scope="session")
def stage1_pipeline(tmp_path_factory, demo_cache) -> dict:
    """The same run in pipeline mode (2 stages on 2 ranks)."""
    return _stage1(tmp_path_factory, "s1_pipe", PIPELINE, demo_cache)


@pytest.fixture(scope="session")
def stage2_zero3(tmp_path_factory, stage1_zero3) -> dict:
    """Uninterrupted 8-step stage-2 run (zero3, 2 ranks, mixed text/multimodal micro-batches of one sample)
    from the zero3 stage-1 checkpoint, saving every 3 steps."""
    save_dir = tmp_path_factory.mktemp("s2_zero3") / "run"
    args = [
        f"model.init_from_stage1={stage1_zero3['save_dir']}",
        f"data.cache_dir={stage1_zero3['cache']}",
        *STAGE2_RESUME,
        f"train.save_dir={save_dir}",
    ]
    result = run_stage2(2, args)
    assert result.returncode == 0, tail(result)
    return {"save_dir": save_dir, "args": args, "metrics": metrics(save_dir), "result": result}
