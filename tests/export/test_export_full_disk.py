"""An export onto a full disk is one line (file, free space) and leaves nothing at the output."""

from __future__ import annotations

import subprocess

import pytest

from mks2.export.atomic import ExportWriteError
from mks2.export.convert import export_model
from tests.export.export_helpers import run_config, tiny_model


def test_export_onto_a_full_disk_is_one_error_and_leaves_nothing(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs for the full-disk test: {mounted.stderr.decode().strip()}")
    try:
        cfg = run_config("model.stage=mome")
        with pytest.raises(ExportWriteError, match=r"No space left on device \(\d+\.\d MiB free in .*nothing was"):
            export_model(tiny_model(cfg), cfg, disk / "out", dtype="fp32", progress=False, verify=False)
        assert list(disk.iterdir()) == []  # no output, no partial directory
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
