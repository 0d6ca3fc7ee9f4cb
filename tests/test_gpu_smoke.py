"""tools/gpu_smoke.py on a CPU-only machine: without ``--cpu`` it says "no GPU" and exits 2 having checked
nothing; with ``--cpu`` its CPU-checkable parts run and pass (llama parity against transformers in fp32,
SDPA vs eager on packed + padded rows, the MoME op against its reference), and a broken part is reported
as FAIL with exit 1. In-process (~25 s); the gloo collective check spawns processes and is left to
``python tools/gpu_smoke.py --cpu``."""

from __future__ import annotations

import pytest
import torch

from tools import gpu_smoke

CPU_PARTS = ["--cpu", "--only", "llama-parity", "attention", "mome-op"]


def test_no_gpu_says_so_and_exits_nonzero(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.main([]) == gpu_smoke.NO_GPU == 2
    err = capsys.readouterr().err
    assert err.startswith("no GPU:") and "--cpu" in err and "nothing was checked" in err


@pytest.mark.slow
def test_cpu_parts_pass(capsys):
    assert gpu_smoke.main(CPU_PARTS) == 0
    out = capsys.readouterr().out
    for name in ("llama-parity", "attention", "mome-op"):
        assert f"PASS {name}" in out, out
    assert "picks sdpa" in out and "3/3 checks passed" in out


def test_a_failing_check_is_reported_and_exits_1(monkeypatch, capsys):
    def wrong(*args, **kwargs):  # a mixing op that drops the second expert
        x, w, y = args[:3]
        return y[0] * 1.0

    monkeypatch.setattr("mks2.ops.mome_mix", wrong)
    assert gpu_smoke.main(["--cpu", "--only", "mome-op"]) == 1
    assert "FAIL mome-op" in capsys.readouterr().out
