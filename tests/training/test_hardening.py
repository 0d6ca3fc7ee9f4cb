"""A plain ``python launch/pretrain_mvm.py`` runs a world of one without MPI, on a free port when the
default one is busy; a resume with another ``train.seed`` is one line naming the key."""

from __future__ import annotations

import contextlib
import socket
import subprocess

import pytest

from mks2 import checkpoint as ckpt
from tests.launching import metrics, run, tail
from tests.tiny import TINY

pytestmark = pytest.mark.slow

BROKEN_MPI = 'raise RuntimeError("cannot load MPI library")\n'


@contextlib.contextmanager
def busy_default_port():
    """Something listening on 29500 (if something already is, it is busy anyway)."""
    with socket.socket() as s:
        with contextlib.suppress(OSError):
            s.bind(("", 29500))
            s.listen()
        yield


def test_plain_python_without_mpi_on_a_busy_port_then_a_changed_seed(tmp_path):
    fake = tmp_path / "fake_site" / "mpi4py"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(BROKEN_MPI)  # an mpi4py whose MPI library cannot load
    env = {"PYTHONPATH": str(fake.parent)}
    save_dir = tmp_path / "run"
    with busy_default_port():
        result = run("python", 1, [*TINY, "train.max_steps=2", f"train.save_dir={save_dir}"], env=env, timeout=240)
    assert result.returncode == 0, tail(result)
    assert (save_dir / ckpt.tag_for(2) / ckpt.MARKER).is_file()

    resumed = run("python", 1, [*TINY, "train.max_steps=3", "train.seed=99", f"train.save_dir={save_dir}"], env=env)
    assert resumed.returncode != 0
    assert "train.seed: checkpoint 1234, now 99" in resumed.output, tail(resumed)
    assert "Traceback" not in resumed.output, tail(resumed)
    assert not (save_dir / ckpt.tag_for(3)).exists()


@contextlib.contextmanager
def small_tmpfs(where, size_kib: int):
    """A tmpfs of ``size_kib`` at ``where`` (needs mount rights: root in the test container)."""
    where.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(where)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test: {mounted.stderr.decode().strip()}")
    try:
        yield lambda kib: subprocess.run(["mount", "-o", f"remount,size={kib}k", str(where)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_stops_the_run_in_one_line_and_the_next_start_resumes(tmp_path):
    # One checkpoint of this model takes about 1.7 MB: the second save cannot fit in 2.5 MB.
    args = [*TINY, "train.max_steps=3", "train.save_interval=1", "train.keep_last=2"]
    with small_tmpfs(tmp_path / "disk", 2500) as resize:
        save_dir = tmp_path / "disk" / "run"
        full = run("python", 1, [*args, f"train.save_dir={save_dir}"], timeout=240)
        assert full.returncode != 0
        assert "checkpoint step_00000002 could not be written: " in full.output, tail(full)
        assert "MiB free in" in full.output and "Last complete checkpoint: step_00000001" in full.output
        assert "Traceback" not in full.output, tail(full)
        assert (save_dir / ckpt.tag_for(1) / ckpt.MARKER).is_file()
        assert not (save_dir / ckpt.tag_for(2)).exists()
        assert [r["step"] for r in metrics(save_dir)] == [1, 2]

        resize(8192)
        resumed = run("python", 1, [*args, f"train.save_dir={save_dir}"], timeout=240)
        assert resumed.returncode == 0, tail(resumed)
        assert [r["step"] for r in metrics(save_dir)] == [1, 2, 3]
        assert (save_dir / ckpt.tag_for(3) / ckpt.MARKER).is_file()
