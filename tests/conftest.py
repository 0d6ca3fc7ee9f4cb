"""Session-wide fixtures shared by every test area."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.launching import metrics, run, run_stage2, tail
from tests.scheduling import order_for_workers
from tests.tiny import PIPELINE, STAGE1_ARGS


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which turns the xdist_group marks into scopes
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER"):  # only under xdist: a plain run keeps the file order
        order_for_workers(items)


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory) -> Path:
    """A ``data.cache_dir`` holding a complete demo-world build (built once per test session, ~30 s on
    2 cores). Set ``MKS2_DEMO_CACHE=DIR`` to reuse a persistent cache across sessions: the build is
    keyed by the generator's source hash, so a stale build there is never reused."""
    from mks2.demo import ensure_built

    env = os.environ.get("MKS2_DEMO_CACHE")
    if env:
        cache = Path(env).expanduser()
    elif os.environ.get("PYTEST_XDIST_WORKER"):  # one build for all workers (ensure_built locks; others wait)
        cache = tmp_path_factory.getbasetemp().parent / "demo_cache"
    else:
        cache = tmp_path_factory.mktemp("demo_cache")
    ensure_built(cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def demo_root(demo_cache) -> Path:
    """Root directory of the session's demo build (``<demo_cache>/demo-v<V>-<fingerprint>``)."""
    from mks2.demo import build_dir_name

    return demo_cache / build_dir_name()


# ---------------------------------------------------------------------------------------------------
# Real 2-rank runs (deepspeed launcher, CPU) that several test areas read: the stage-2 tests continue from
# the stage-1 checkpoints and compare against the stage-2 run; the export tests convert all three. Each
# costs ~20 s on 2 cores and is built once per session, only when a test asks. Tests only read them.
# ---------------------------------------------------------------------------------------------------

# LoRA on the attention's q_proj as well as both experts: the export tests count the merged projections
# of every target kind (2 layers x (3 MLP + 3 MVM + 1 q_proj)).
STAGE2_RUN_ARGS = ["train.max_steps=8", "train.save_interval=3", "train.keep_last=5",
                   "model.lora.targets=[mlp,mvm,q_proj]"]  # fmt: skip


def _stage1_run(tmp_path_factory, name: str, extra: list[str], demo_cache: Path) -> dict:
    save_dir = tmp_path_factory.mktemp(name) / "run"
    result = run("deepspeed", 2, [*STAGE1_ARGS, *extra, f"train.save_dir={save_dir}", f"data.cache_dir={demo_cache}"])
    assert result.returncode == 0, tail(result)
    return {"save_dir": save_dir, "cache": demo_cache}


@pytest.fixture(scope="session")
def stage1_zero3(tmp_path_factory, demo_cache) -> dict:
    """A 4-step stage-1 run (zero3, 2 ranks) with its final checkpoint: {"save_dir", "cache"}."""
    return _stage1_run(tmp_path_factory, "s1_zero3", [], demo_cache)


@pytest.fixture(scope="session")
def stage1_pipeline(tmp_path_factory, demo_cache) -> dict:
    """The same run in pipeline mode (2 stages on 2 ranks)."""
    return _stage1_run(tmp_path_factory, "s1_pipe", PIPELINE, demo_cache)


@pytest.fixture(scope="session")
def stage2_zero3(tmp_path_factory, stage1_zero3) -> dict:
    """Uninterrupted 8-step stage-2 run (zero3, 2 ranks, mixed text/multimodal micro-batches of one sample)
    from the zero3 stage-1 checkpoint, saving every 3 steps: {"save_dir", "args", "metrics", "result"}."""
    save_dir = tmp_path_factory.mktemp("s2_zero3") / "run"
    args = [
        f"model.init_from_stage1={stage1_zero3['save_dir']}",
        f"data.cache_dir={stage1_zero3['cache']}",
        *STAGE2_RUN_ARGS,
        f"train.save_dir={save_dir}",
    ]
    result = run_stage2(2, args)
    assert result.returncode == 0, tail(result)
    return {"save_dir": save_dir, "args": args, "metrics": metrics(save_dir), "result": result}
