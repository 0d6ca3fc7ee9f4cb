"""Session-wide reference runs of the resume tests (each costs ~20 s on 2 cores)."""

from __future__ import annotations

import pytest

from tests.launching import metrics, run, tail
from tests.tiny import PIPELINE, RESUME_ARGS, TINY


def _reference(tmp_path_factory, name: str, extra: list[str]) -> dict:
    save_dir = tmp_path_factory.mktemp(name) / "run"
    result = run("deepspeed", 2, [*TINY, *RESUME_ARGS, *extra, f"train.save_dir={save_dir}"])
    assert result.returncode == 0, tail(result)
    return {"save_dir": save_dir, "metrics": metrics(save_dir), "extra": extra, "result": result}


@pytest.fixture(scope="session")
def zero3_reference(tmp_path_factory) -> dict:
    """Uninterrupted 20-step zero3 run on 2 ranks (data parallel 2), checkpoints every 5 steps."""
    return _reference(tmp_path_factory, "zero3_ref", [])


@pytest.fixture(scope="session")
def pipeline_reference(tmp_path_factory) -> dict:
    """Uninterrupted 20-step pipeline run: 2 stages on 2 ranks (data parallel 1)."""
    return _reference(tmp_path_factory, "pipe_ref", PIPELINE)
