"""tools/demo_experiment.py end to end on a reduced schedule (a handful of steps per stage, one seed)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.launching import REPO
from tools.demo_experiment import paired_over_seeds


def test_demo_experiment_command_end_to_end(tmp_path, demo_cache):
    """Every stage runs, the table (mean ± SE over seeds x questions) prints, finished stages are reused."""
    out = tmp_path / "exp"
    cmd = [sys.executable, str(REPO / "tools" / "demo_experiment.py"), "--out", str(out), "--world", "no_leak",
           "--seeds", "1", "--cache-dir", str(demo_cache), "--base-steps", "3", "--stage1-steps", "2",
           "--stage2-steps", "2", "--variants", "mks2", "inst_lora", "--stage2-args", "train.warmup_steps=1",
           "--stage1-args", "train.warmup_steps=1", "train.eval_interval=-1", "--eval-limit", "40"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert "| MKS2 |" in res.stdout and "| INST-LoRA |" in res.stdout and "| chance |" in res.stdout
    assert "MKS2 - INST-LoRA on held-out:" in res.stdout and " ± " in res.stdout and "no SE over seeds" in res.stdout
    results = json.loads((out / "no_leak" / "results.json").read_text())
    assert results["world"] == "no_leak" and results["seeds"] == [1234]
    agg = results["aggregate"]
    assert set(agg) == {"mks2", "inst_lora"} and "heldout_mvm_only" in agg["mks2"]
    held = agg["mks2"]["heldout"]["all"]
    assert held["n"] == 40 and 0 <= held["acc"] <= 1 and held["se"] > 0 and len(held["per_seed"]) == 1
    assert set(results["per_seed"][0]["linear_probe"]) >= {"base LM", "stage1", "stage 2 mks2"}
    seed_dir = out / "no_leak" / "seed_1234"
    assert (seed_dir / "stage2_inst_lora" / "latest").is_file() and (seed_dir / "base_lm" / "config.json").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)  # finished stages are reused
    assert again.returncode == 0 and "[1] stage" not in again.stdout and "[2] stage 2" not in again.stdout


def test_paired_difference_over_seeds():
    """Mean of the per-seed differences and sd / sqrt(k): by hand, diffs 0.1, 0.2, 0.3 -> 0.2 ± 0.1/sqrt(3)."""
    p = paired_over_seeds([0.5, 0.6, 0.7], [0.4, 0.4, 0.4])
    assert abs(p["diff"] - 0.2) < 1e-12 and abs(p["se"] - 0.1 / 3**0.5) < 1e-12 and p["seeds"] == 3
    assert paired_over_seeds([0.5], [0.4]) is None
