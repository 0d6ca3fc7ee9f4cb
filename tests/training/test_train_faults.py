"""Fault handling and the other launchers: NaN skipped on every rank (mpirun), too many non-finite
steps stop the run with the last good checkpoint intact (torchrun), SIGTERM saves and exits 0."""

from __future__ import annotations

import math
import os
import signal
import time

import psutil
import pytest

import mks2
from tests.launching import finish, metrics, run, start, tail
from tests.tiny import TINY

PACKAGE_DIR = os.path.dirname(mks2.__file__)  # frames of a traceback through our code start with it

pytestmark = pytest.mark.slow


def test_nan_on_one_rank_is_skipped_on_every_rank_under_mpirun(tmp_path):
    """bf16 here (the other runs are fp32): DeepSpeed's skip must not depend on an fp16 loss scaler."""
    save_dir = tmp_path / "run"
    args = [*TINY, "train.precision=bf16", "train.max_steps=6", "train.save_interval=0", "train.tensorboard=true"]
    args.append(f"train.save_dir={save_dir}")
    env = {"MKS2_INJECT_NAN": "3:1", "MKS2_PEAK_TFLOPS": "0.05"}  # NaN at step 3 on rank 1 only; MFU as on a GPU
    result = run("mpirun", 2, args, env=env)
    assert result.returncode == 0, tail(result)
    recs = metrics(save_dir)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    bad = recs[2]
    assert bad["skipped"] == 1 and bad["skipped_ranks"] == 2 and bad["skipped_total"] == 1  # both ranks skipped
    assert math.isnan(bad["loss"])
    for r in recs[:2] + recs[3:]:
        assert r["skipped"] == 0 and r["skipped_ranks"] == 0 and math.isfinite(r["loss"]), r
    assert "step 3: non-finite loss or gradient norm; update skipped on all ranks" in result.output
    assert all(0 < r["mfu"] < 1 for r in recs if not r["skipped"]), [r.get("mfu") for r in recs]
    assert list((save_dir / "tensorboard").rglob("events.out.tfevents.*"))  # DeepSpeed's monitor wrote events
    trainer = (save_dir / "step_00000006" / "mks2" / "trainer.json").read_text()
    assert '"world_size": 2' in trainer  # mpirun really started two ranks (mpi4py discovery)


def test_consecutive_non_finite_steps_stop_the_run_under_torchrun(tmp_path):
    save_dir = tmp_path / "run"
    args = [
        *TINY,
        "train.max_steps=10",
        "train.save_interval=2",
        "train.max_skipped_steps=3",
        f"train.save_dir={save_dir}",
    ]
    result = run("torchrun", 2, args, env={"MKS2_INJECT_NAN": "3:0,4:0,5:0"})
    assert result.returncode != 0
    assert "stopping at step 5: 3 consecutive steps (steps 3-5) had a non-finite loss or gradient norm" in result.output
    assert "Last good checkpoint: step_00000002" in result.output
    # A user-facing error, not a traceback through our code (torchrun's own report of the failed
    # children is a traceback through torch; paths under ~/.cache/mks2 are the demo data).
    assert f'File "{PACKAGE_DIR}' not in result.output
    assert (save_dir / "step_00000002" / "COMPLETE").is_file()
    assert not (save_dir / "step_00000004").exists()  # no save while the updates are being skipped
    assert (save_dir / "latest").read_text() == "step_00000002"
    assert [r["skipped"] for r in metrics(save_dir)] == [0, 0, 1, 1, 1]


def test_sigterm_to_one_rank_saves_a_checkpoint_and_exits_zero(tmp_path):
    save_dir = tmp_path / "run"
    args = [*TINY, "train.max_steps=100000", "train.save_interval=0", f"train.save_dir={save_dir}"]
    t0 = time.monotonic()
    proc = start("deepspeed", 2, args)
    try:
        path = save_dir / "metrics.jsonl"
        while not (path.is_file() and len(path.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() - t0 < 180, "no training steps within 180 s"
            time.sleep(0.2)
        group = [p for p in psutil.process_iter(["pid", "cmdline"]) if _in_group(p, proc.pid)]
        rank1 = [p for p in group if "--local_rank=1" in " ".join(p.info["cmdline"] or [])]
        assert len(rank1) == 1, [p.info["cmdline"] for p in group]
        rank1[0].send_signal(signal.SIGTERM)  # what Slurm's preemption does to a task
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    result = finish(proc, 180, t0)
    assert result.returncode == 0, tail(result)
    last = metrics(save_dir)[-1]["step"]
    assert f"preemption signal received: saved step_{last:08d} at step {last}" in result.output
    assert (save_dir / f"step_{last:08d}" / "COMPLETE").is_file()
    assert (save_dir / "latest").read_text() == f"step_{last:08d}"


def _in_group(p: psutil.Process, pgid: int) -> bool:
    try:
        return os.getpgid(p.pid) == pgid
    except (ProcessLookupError, PermissionError):
        return False
