"""Invalid combinations fail before any DeepSpeed engine exists, with our own message and a non-zero exit
(no traceback), here under torchrun with the real world size. The single-process cases (pipeline with
zero3, stages that do not divide the world, resume=require without a checkpoint, ...) are rows of the
table in tests/test_user_errors.py."""

from __future__ import annotations

import re

import pytest

from tests.launching import run
from tests.tiny import TINY

pytestmark = pytest.mark.slow


def _assert_user_error(result, *fragments):
    assert result.returncode != 0
    for fragment in fragments:
        assert fragment in result.output, result.output[-3000:]
    # No traceback through our code (torchrun prints its own ChildFailedError traceback; that one is fine).
    # (A traceback frame names a file and a line; the demo cache path, ~/.cache/mks2/, may appear in a log line.)
    ours = re.search(r'File "[^"]*(/mks2/|pretrain_mvm\.py)[^"]*", line', result.output)
    assert ours is None, result.output[-3000:]


def test_batch_arithmetic_checked_against_the_real_world_size(tmp_path):
    args = [*TINY, "train.micro_batch_size=4", "train.global_batch_size=4", f"train.save_dir={tmp_path}"]
    result = run("torchrun", 2, args, timeout=90)
    _assert_user_error(
        result,
        "train.global_batch_size (4) must be a multiple of micro_batch_size x data-parallel size = 4 x 2 = 8",
    )
