"""``parallel.frozen_base=replicate`` (ZeRO-2: the frozen base whole on every GPU, no per-micro-batch
gathers) trains the same losses as the ZeRO-3 ``partition`` run of the session fixture, and its frozen
parameters are plain tensors on every rank (no ZeRO ``ds_id``, every element held), while the partition
run's are ZeRO-managed. The engine checks this on every rank (raising if replicate did not hold) and
rank 0 logs it to ``logs/train.log``. One launch (~20 s); the partition run is the shared fixture."""

from __future__ import annotations

import re

import pytest
from torch import nn

from mks2.config import FrozenBase
from mks2.training.frozen_base import check_frozen_base, frozen_base_report
from tests.launching import metrics, run, tail
from tests.tiny import STAGE1_ARGS

pytestmark = pytest.mark.slow

LINE = re.compile(
    r"frozen base \((\w+)\): (\d+) tensors, ([\d,]+) parameters, .* \((\d+) ZeRO-partitioned, ([\d,]+) held"
)


def _frozen_line(save_dir) -> tuple[str, int, int, int, int]:
    text = (save_dir / "logs" / "train.log").read_text()
    m = LINE.search(text)
    assert m, text[-2000:]
    choice, tensors, elements, managed, local = m.groups()
    return choice, int(tensors), int(elements.replace(",", "")), int(managed), int(local.replace(",", ""))


def test_replicate_trains_like_partition_and_keeps_frozen_weights_whole(tmp_path, stage1_zero3):
    save_dir = tmp_path / "replicate"
    args = [*STAGE1_ARGS, "parallel.frozen_base=replicate", f"train.save_dir={save_dir}",
            f"data.cache_dir={stage1_zero3['cache']}"]  # fmt: skip
    result = run("deepspeed", 2, args)
    assert result.returncode == 0, tail(result)
    ours, ref = metrics(save_dir), metrics(stage1_zero3["save_dir"])
    assert len(ours) == len(ref) == 4
    for a, b in zip(ours, ref):
        for key in ("loss_caption", "loss_retrieval"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(b[key]), (key, ours, ref)
    choice, tensors, elements, managed, local = _frozen_line(save_dir)
    assert choice == "replicate" and tensors > 0 and managed == 0 and local == elements
    choice, tensors_p, elements_p, managed_p, local_p = _frozen_line(stage1_zero3["save_dir"])
    assert choice == "partition" and managed_p == tensors_p == tensors and local_p == 0 and elements_p == elements


def test_check_raises_when_replicate_does_not_hold():
    frozen = nn.Linear(4, 3)
    frozen.requires_grad_(False)
    assert frozen_base_report(frozen).elements == 15
    check_frozen_base(frozen, FrozenBase.REPLICATE)  # plain tensors: holds
    frozen.weight.ds_id = 7  # what a ZeRO-3 parameter carries
    with pytest.raises(RuntimeError, match="replicate did not hold"):
        check_frozen_base(frozen, FrozenBase.REPLICATE)
    assert "1 ZeRO-partitioned" in check_frozen_base(frozen, FrozenBase.PARTITION)
