"""Old demo builds are pruned after a new build: the newest complete ones stay, the one just built always,
incomplete directories (a build in progress elsewhere) and builds whose lock is held are left alone."""

from __future__ import annotations

import fcntl
import os

from mks2.demo.builder import MARKER, prune_old_builds


def _build(cache, name: str, finished_at: float, complete: bool = True):
    root = cache / name
    (root / "shards").mkdir(parents=True)
    if complete:
        (root / MARKER).write_text("{}")
        os.utime(root / MARKER, (finished_at, finished_at))
    return root


def test_prune_keeps_the_newest_builds(tmp_path):
    old, older, oldest = (_build(tmp_path, f"demo-v1-{n}", t) for n, t in (("b", 300), ("c", 200), ("d", 100)))
    current = _build(tmp_path, "demo-v1-a", 50)  # just built, even if its marker looks older
    in_progress = _build(tmp_path, "demo-v1-e", 0, complete=False)
    removed = prune_old_builds(tmp_path, keep=2, current=current)
    assert removed == [older, oldest]
    assert current.is_dir() and old.is_dir() and in_progress.is_dir()
    assert not older.exists() and not oldest.exists() and not (tmp_path / ".demo-v1-c.lock").exists()


def test_prune_skips_a_build_whose_lock_is_held(tmp_path):
    current = _build(tmp_path, "demo-v1-a", 300)
    busy = _build(tmp_path, "demo-v1-b", 100)
    fd = os.open(tmp_path / ".demo-v1-b.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert prune_old_builds(tmp_path, keep=1, current=current) == []  # another process holds it
    finally:
        os.close(fd)
    assert busy.is_dir()


def test_a_build_in_use_by_a_running_job_is_not_pruned(tmp_path, monkeypatch):
    """ensure_built keeps a shared lock on the build it returns for the process's life: a newer build of
    another source version (another checkout, a CI run) must not delete the data under a running job."""
    from mks2.demo import builder

    def fake_build(root, *, progress=True, world="no_leak"):
        (root / "shards").mkdir(parents=True)
        (root / MARKER).write_text("{}")
        os.utime(root / MARKER, (100, 100))  # older than the build below

    monkeypatch.setattr(builder, "build", fake_build)
    root, built = builder.ensure_built(tmp_path, progress=False)
    lock = tmp_path / f".{root.name}.lock"
    try:
        assert built and lock in builder._IN_USE
        assert builder.ensure_built(tmp_path, progress=False) == (root, False)  # reuse: no self-deadlock
        newer = _build(tmp_path, "demo-v9-newer", 300)
        assert prune_old_builds(tmp_path, keep=1, current=newer) == [] and root.is_dir()
    finally:
        builder._release_in_use(lock)
    assert prune_old_builds(tmp_path, keep=1, current=newer) == [root]  # once the job is gone it may go
