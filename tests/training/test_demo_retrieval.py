"""The acceptance run of issue 4: ``deepspeed launch/pretrain_mvm.py`` with the embedded demo config
on the CPU, within 10 minutes, reaches held-out text-to-image retrieval top-1 >= 10x chance on the
100-image gallery. Also checks the curves tool on the run it produced."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.launching import REPO, metrics, run, tail

pytestmark = pytest.mark.slow


def test_demo_run_reaches_10x_chance_retrieval_top1(tmp_path):
    save_dir = tmp_path / "demo"
    result = run("deepspeed", 1, [f"train.save_dir={save_dir}"], timeout=600)
    assert result.returncode == 0, tail(result)
    assert result.seconds < 600
    final = metrics(save_dir)[-1]
    assert final["step"] == 200 and final["eval_gallery"] == 100
    assert final["eval_retrieval_top1"] >= 10 * final["eval_chance_top1"], final
    assert (save_dir / "step_00000200" / "COMPLETE").is_file()

    png = tmp_path / "curves.png"
    plot = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_metrics.py"), str(save_dir), "--smooth", "5", "-o", str(png)],
        capture_output=True,
        text=True,
    )
    assert plot.returncode == 0, plot.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [sys.executable, str(REPO / "tools" / "plot_metrics.py"), str(save_dir), "--keys", "nope", "-o", str(png)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode != 0 and "no run has finite values for nope" in bad.stderr
