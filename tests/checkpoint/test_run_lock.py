"""One run per train.save_dir: a second run is refused naming the holder; a dead run's lock is taken
over with a warning and its incomplete checkpoints are removed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mks2 import checkpoint as ckpt
from mks2.checkpoint.run_lock import LOCK_FILE
from tests.launching import run
from tests.tiny import TINY

HOLD = """
import sys, time
from mks2.checkpoint import SaveDirLock
lock = SaveDirLock(sys.argv[1]).acquire()
print("held", flush=True)
time.sleep(120)
"""


@pytest.fixture
def holder(tmp_path):
    """Another process holding tmp_path/run's lock (killed afterwards)."""
    save_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(save_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield save_dir, proc
    proc.kill()
    proc.wait()


def test_second_holder_is_refused_naming_the_first(holder):
    save_dir, proc = holder
    with pytest.raises(
        ckpt.SaveDirBusyError, match=rf"in use by another run \(host {socket.gethostname()}, PID {proc.pid}"
    ):
        ckpt.SaveDirLock(save_dir).acquire()


def test_stale_lock_is_taken_over_and_incomplete_checkpoints_removed(tmp_path):
    save_dir = tmp_path / "run"
    (save_dir / ckpt.tag_for(5) / "mks2").mkdir(parents=True)  # a save that never got its COMPLETE marker
    (save_dir / ckpt.tag_for(4)).mkdir()
    (save_dir / ckpt.tag_for(4) / ckpt.MARKER).write_text("{}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (save_dir / LOCK_FILE).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": time.time()})
    )
    with ckpt.SaveDirLock(save_dir) as lock:
        assert any(f"PID {dead.pid}" in w and "taking over" in w for w in lock.warnings), lock.warnings
        assert not (save_dir / ckpt.tag_for(5)).exists()
        assert (save_dir / ckpt.tag_for(4) / ckpt.MARKER).exists()
        recorded = json.loads((save_dir / LOCK_FILE).read_text())
        assert recorded["pid"] == os.getpid() and recorded["host"] == socket.gethostname()
    assert not (save_dir / LOCK_FILE).exists()  # released
    ckpt.SaveDirLock(save_dir).acquire().release()  # and free again


@pytest.mark.slow
def test_a_training_run_into_a_busy_save_dir_is_refused_at_start_up(holder):
    save_dir, proc = holder
    (save_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p: p.read_bytes() for p in save_dir.rglob("*") if p.is_file()}
    result = run("python", 1, [*TINY, "train.max_steps=2", f"train.save_dir={save_dir}"], timeout=120)
    assert result.returncode != 0
    assert f"in use by another run (host {socket.gethostname()}, PID {proc.pid}" in result.output, result.output[-3000:]
    assert "Traceback" not in result.output, result.output[-3000:]
    assert all(p.read_bytes() == data for p, data in before.items())  # the holder's files untouched
    assert not list(Path(save_dir).glob("step_*"))
