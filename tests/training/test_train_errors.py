"""Invalid combinations and impossible resumes fail before any DeepSpeed engine exists, with our
own message and a non-zero exit (no traceback)."""

from __future__ import annotations

import pytest

from tests.launching import run
from tests.tiny import TINY

pytestmark = pytest.mark.slow


def _assert_user_error(result, *fragments):
    assert result.returncode != 0
    for fragment in fragments:
        assert fragment in result.output, result.output[-3000:]
    # No traceback through our code (torchrun prints its own ChildFailedError traceback; that one is fine).
    assert "/mks2/" not in result.output and 'pretrain_mvm.py", line' not in result.output, result.output[-3000:]


def test_pipeline_with_zero3_is_refused_by_the_config(tmp_path):
    args = [*TINY, "parallel.mode=pipeline", "parallel.pipeline_stages=2", "parallel.zero_stage=3"]
    result = run("python", 1, [*args, f"train.save_dir={tmp_path}"], timeout=60)
    _assert_user_error(result, "parallel.zero_stage=3 cannot be used with parallel.mode=pipeline")


def test_world_size_not_divisible_by_the_stages(tmp_path):
    args = [*TINY, "parallel.mode=pipeline", "parallel.pipeline_stages=2"]
    result = run("python", 1, [*args, f"train.save_dir={tmp_path}"], timeout=60)
    _assert_user_error(result, "world size 1 is not divisible by parallel.pipeline_stages (2)")


def test_batch_arithmetic_checked_against_the_real_world_size(tmp_path):
    args = [*TINY, "train.micro_batch_size=4", "train.global_batch_size=4", f"train.save_dir={tmp_path}"]
    result = run("torchrun", 2, args, timeout=90)
    _assert_user_error(
        result,
        "train.global_batch_size (4) must be a multiple of micro_batch_size x data-parallel size = 4 x 2 = 8",
    )


def test_resume_require_without_a_checkpoint(tmp_path):
    args = [*TINY, "train.resume=require", f"train.save_dir={tmp_path / 'empty'}"]
    result = run("python", 1, args, timeout=120)
    _assert_user_error(result, "train.resume=require but", "holds no complete checkpoint")
