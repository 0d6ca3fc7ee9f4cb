"""The accounting a real run logs (``metrics.jsonl`` of the session's 2-rank stage-1 and stage-2 runs)
equals counts computed here, independently, from the same batches: every rank's loader rebuilt
in-process, each micro-batch prepared as the engine gets it, real tokens and causal attention pairs read
off the attention mask the model builds (``attention_allowed``), positions off the tensor's shape."""

from __future__ import annotations

import pytest
import torch

from mks2.config import bundled_config, load_config
from mks2.data.collate import attention_allowed
from mks2.demo import resolve
from mks2.model import build_model
from mks2.training.batch import grad_accumulation_steps
from mks2.training.flops import flops_model
from mks2.training.frozen_vision import FrozenVision
from mks2.training.task import BatchCounts
from tests.launching import metrics
from tests.tiny import STAGE1_ARGS, STAGE2_ARGS

pytestmark = pytest.mark.slow

RANKS = 2  # the fixtures' runs: 2 ranks, data parallel 2


def _independent(prepared: dict[str, torch.Tensor], samples: int) -> dict[str, int]:
    seg = prepared["segment_ids"]  # [rows, S], every view of the micro-batch
    allowed = attention_allowed(seg)  # [rows, S, S]: causal, same segment, not padding
    return {
        "samples": samples,
        "tokens": int(allowed.diagonal(dim1=1, dim2=2).sum()),  # a real token attends to itself
        "positions": int(prepared["input_ids"].numel()),
        "attention_pairs": int(allowed.sum()),
    }


def _replay(cfg, task, steps: int, samples_of) -> tuple[list[dict[str, int]], list[BatchCounts]]:
    """Per optimizer step: the independent counts summed over ranks and micro-batches, and the task's."""
    cpu = torch.device("cpu")
    vision = FrozenVision.build(cfg.model, cpu, torch.float32)
    loaders = [iter(task.build_loader(cfg, dp_rank=r, dp_size=RANKS)) for r in range(RANKS)]
    micro = grad_accumulation_steps(cfg, RANKS)
    expected, by_task = [], []
    for _ in range(steps):
        step = dict.fromkeys(("samples", "tokens", "positions", "attention_pairs"), 0)
        counts = BatchCounts()
        for it in loaders:
            for _ in range(micro):
                batch = next(it)
                counts = counts + task.counts(batch)
                prepared = task.prepare(batch, vision, cpu)
                for k, v in _independent(prepared, samples_of(prepared)).items():
                    step[k] += v
        expected.append(step)
        by_task.append(counts)
    return expected, by_task


def _check(records: list[dict], expected: list[dict[str, int]], by_task: list[BatchCounts], fm) -> None:
    assert len(records) == len(expected)
    for r, e, c in zip(records, expected, by_task, strict=True):
        logged = {k: r[k] for k in ("samples", "tokens", "positions")}
        assert logged == {k: e[k] for k in logged}, (r["step"], logged, e)
        assert c.attention_pairs == e["attention_pairs"], (r["step"], c, e)
        assert r["padding_fraction"] == pytest.approx(1 - e["tokens"] / e["positions"])
        assert r["tokens_per_s"] == pytest.approx(e["tokens"] / r["step_time_s"])
        # The engine's FLOPs model (built under ZeRO-3: partitioned parameters) is this unpartitioned one.
        assert r["flops"] == pytest.approx(fm.step_flops(c), rel=1e-12)
        assert 0 < e["tokens"] < e["positions"]


def test_stage1_logged_counts_equal_the_batches(stage1_zero3):
    from mks2.training.stage1 import Stage1Task

    run = stage1_zero3
    args = [*STAGE1_ARGS, f"train.save_dir={run['save_dir']}", f"data.cache_dir={run['cache']}"]
    cfg = resolve(load_config(None, args))
    task = Stage1Task(cfg)
    records = metrics(run["save_dir"])
    expected, by_task = _replay(cfg, task, len(records), lambda p: int(p["image_emb"].shape[0]))  # one per caption
    fm = flops_model(build_model(cfg), recompute=bool(cfg.train.activation_checkpointing))
    _check(records, expected, by_task, fm)


def test_stage2_logged_counts_equal_the_batches(stage2_zero3):
    from mks2.training.stage2 import Stage2Task

    run = stage2_zero3
    cfg = resolve(load_config(str(bundled_config("demo_stage2.yaml")), [*STAGE2_ARGS, *run["args"]]))
    task = Stage2Task(cfg)  # adopts the stage-1 run's architecture into cfg

    def samples(p: dict[str, torch.Tensor]) -> int:  # segment starts: positions restart at 0 in each
        return int(((p["position_ids"] == 0) & (p["segment_ids"] != 0)).sum())

    records = metrics(run["save_dir"])
    expected, by_task = _replay(cfg, task, len(records), samples)
    fm = flops_model(build_model(cfg), recompute=bool(cfg.train.activation_checkpointing))
    _check(records, expected, by_task, fm)
