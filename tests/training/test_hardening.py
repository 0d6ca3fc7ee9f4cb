"""A plain ``python launch/pretrain_mvm.py`` runs a world of one without MPI, on a free port when the
default one is busy; a resume with another ``train.seed`` is one line naming the key."""

from __future__ import annotations

import contextlib
import socket

import pytest

from mks2 import checkpoint as ckpt
from tests.launching import run, tail
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
