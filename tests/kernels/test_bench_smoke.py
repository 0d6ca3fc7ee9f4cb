"""``python kernels/bench.py --device cpu --quick``: the harness runs end to end and writes labelled outputs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_bench_cpu_quick_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, "kernels/bench.py", "--device", "cpu", "--quick", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "NOT meaningful" in proc.stdout

    lines = (tmp_path / "mix.csv").read_text().splitlines()
    assert lines[-1].startswith("# CPU smoke run: figures NOT meaningful")
    rows = list(csv.DictReader(line for line in lines if not line.startswith("#")))
    got = {(r["backend"], r["pass"], int(r["T"])) for r in rows}
    want = {(b, p, t) for b in ("fused-torch", "eager") for p in ("fwd", "bwd", "both") for t in (64, 256)}
    assert got == want
    for r in rows:
        assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"])
        assert int(r["min_bytes"]) > 0 and float(r["gbps"]) > 0
        if r["backend"] == "eager":
            assert float(r["speedup_vs_eager"]) == 1.0

    block = list(csv.DictReader(x for x in (tmp_path / "block.csv").read_text().splitlines() if not x.startswith("#")))
    assert {r["variant"] for r in block} == {"two-ffn", "mome-fused-torch", "mome-eager"}
    assert all(float(r["saved_mib"]) > 0 for r in block)

    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["note"] == "CPU smoke run: figures NOT meaningful"
    for key in ("device", "torch", "triton", "git_commit", "copy_bw_gbps"):
        assert meta[key], key
    assert (tmp_path / "mix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
