"""The start-of-run figures (passes, batch, time left), the resume schedule warning, the tracker package
check and the run log's error record, in process on made-up manifests and configs."""

from __future__ import annotations

import importlib.util
import logging

import pytest

from mks2.data.errors import DatasetError
from mks2.training import monitoring, summary
from mks2.training.run_log import RunLog, header
from tests.tiny import run_config


def _manifest(rows: int, tokens: int) -> dict:
    return {
        "shards": [
            {"rows": rows // 2, "tokens": tokens // 2},
            {"rows": rows - rows // 2, "tokens": tokens - tokens // 2},
        ]
    }


def _two_datasets(*overrides: str):
    return run_config(
        "model.stage=base",
        "data.datasets=[{path: /data/a, weight: 3}, {path: /data/b, weight: 1}]",
        "train.global_batch_size=16", "train.micro_batch_size=4", "train.max_steps=50", "data.seq_len=64",
        *overrides,
    )  # fmt: skip


def test_passes_without_packing():
    cfg = _two_datasets("data.packing=false")
    figures, per_row = summary.dataset_figures(cfg, [_manifest(20, 400), _manifest(100, 3000)])
    assert per_row == 1.0
    a, b = figures
    assert (a.samples, a.tokens, a.share) == (20, 400, 0.75) and (b.samples, b.tokens, b.share) == (100, 3000, 0.25)
    # 50 steps x 16 samples = 800 drawn: 600 from a (20 samples: 30 passes), 200 from b (100 samples: 2 passes)
    assert a.passes == pytest.approx(30.0) and b.passes == pytest.approx(2.0)
    text = summary.data_summary(cfg, [_manifest(20, 400), _manifest(100, 3000)])
    assert "/data/a: 20 samples, 400 tokens, weight 3 (75% of samples), ~30.00 passes" in text
    assert "global batch: 16 rows = ~16 samples" in text
    assert "/data/a is seen ~30 times" in text and "/data/b is seen" not in text


def test_packing_counts_samples_per_row():
    cfg = _two_datasets("data.packing=true")
    # mean length 0.75 * 20 + 0.25 * 30 = 22.5 -> round 22 -> 64 // 22 = 2 samples a row
    figures, per_row = summary.dataset_figures(cfg, [_manifest(20, 400), _manifest(100, 3000)])
    assert per_row == 2.0 and figures[0].passes == pytest.approx(60.0)


def test_schedule_changes_name_old_and_new():
    cfg = _two_datasets("train.warmup_steps=5")
    saved = {"train": {"max_steps": 40, "warmup_steps": 5, "lr": cfg.train.lr, "min_lr": 0.0}}
    changes = summary.schedule_changes(saved, cfg)
    assert changes == [
        "train.max_steps: checkpoint 40, now 50",
        f"train.min_lr: checkpoint 0.0, now {cfg.train.min_lr}",
    ]


def test_completion_message_and_time_estimate():
    text = summary.completion_message("runs/x", "step_00000200", 200, 200)
    assert "step 200" in text and "train.max_steps=300" in text and "train.resume=none" in text
    # the first step (warm-up) is left out: 10 steps left at 2 s
    assert "~0 min 20 s for 10 steps" in summary.time_estimate([9.0, 2.0, 2.0], 10)
    assert "~2 h 0 min" in summary.time_estimate([1.0, 2.0], 3600)


def test_missing_tracker_package_is_a_config_problem(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    problems = monitoring.monitoring_problems(
        run_config("model.stage=base", "train.wandb=true", "train.tensorboard=true")
    )
    assert len(problems) == 1 and problems[0].startswith("train.wandb=true needs the 'wandb' package")
    assert monitoring.monitoring_problems(run_config("model.stage=base")) == []


def test_run_log_records_user_errors_in_one_line_and_crashes_with_traceback(tmp_path):
    log = RunLog(tmp_path, rank=1)  # not rank 0: no train.log, its own error file
    log.start(["launch/pretrain_mvm.py"], 2)
    log.record_error(DatasetError("data.datasets[0]: dataset directory not found: /x"))
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        log.record_error(exc)
    text = (tmp_path / "logs" / "error_rank1.log").read_text()
    assert "error: data.datasets[0]: dataset directory not found: /x\n" in text
    assert "Traceback (most recent call last)" in text and "RuntimeError: boom" in text
    assert not (tmp_path / "logs" / "train.log").exists()
    assert "world size: 2" in header(["x"], 2)


def test_rank0_log_gets_mks2_lines_until_closed(tmp_path):
    log = RunLog(tmp_path, rank=0)
    log.start(["launch/pretrain_mvm.py", "train.lr=1"], 1)
    logging.getLogger("mks2.training").warning("written to the file")
    log.close()
    logging.getLogger("mks2.training").warning("after close")
    text = (tmp_path / "logs" / "train.log").read_text()
    assert "command: " in text and "train.lr=1" in text and "written to the file" in text and "after close" not in text
