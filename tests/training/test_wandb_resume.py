"""``train.wandb=true``: a start that resumes a checkpoint continues the save_dir's W&B run (same id, its
offline run directory too); a fresh start opens a new one. In-process on ``mks2.training.monitoring`` with
``WANDB_MODE=offline`` (no launch, no network)."""

from __future__ import annotations

import pytest

from mks2.training.monitoring import WandbRun
from tests.tiny import run_config


def _start(save_dir, *, resuming: bool, step: int) -> str:
    cfg = run_config("model.stage=base", "train.wandb=true", "train.wandb_project=mks2-test",
                     f"train.save_dir={save_dir}")  # fmt: skip
    run = WandbRun(cfg, resuming=resuming)
    run.log({"step": step, "loss": 1.0 / step})
    run.finish()
    return run.run_id


def _offline_ids(save_dir) -> list[str]:
    return sorted(p.name.rsplit("-", 1)[1] for p in (save_dir / "wandb").glob("offline-run-*"))


def test_resume_continues_the_run_and_a_fresh_start_opens_a_new_one(tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # an optional extra (pip install .[monitor]); installed in CI
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    save_dir = tmp_path / "run"
    first = _start(save_dir, resuming=False, step=1)
    assert (save_dir / "wandb" / "run_id").read_text().strip() == first
    assert _start(save_dir, resuming=True, step=2) == first  # train.resume=auto found a checkpoint
    assert _offline_ids(save_dir) == [first, first]  # both starts' offline directories name the one run
    fresh = _start(save_dir, resuming=False, step=1)  # e.g. train.resume=none into the same save_dir
    assert fresh != first and (save_dir / "wandb" / "run_id").read_text().strip() == fresh
    assert sorted(_offline_ids(save_dir)) == sorted([first, first, fresh])
