"""The ``mks2`` console script: every subcommand answers --help as the tool it runs, one real small run
(``mks2 plot``), the unknown-command message, and the converter's human units."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from mks2.cli import COMMANDS, available
from tests.launching import REPO, env_for

TOOL_OF = {"pretokenize": "pretokenize", "convert": "convert_to_hf", "evaluate": "evaluate", "chat": "chat",
           "plot": "plot_metrics"}  # fmt: skip


def mks2(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mks2", *args], cwd=cwd or REPO, env=env_for(), capture_output=True,
                          text=True, timeout=120)  # fmt: skip


@pytest.mark.parametrize("command", sorted(available()))  # chat: once tools/chat.py exists
def test_every_command_answers_help(command, tmp_path):
    result = mks2(command, "--help", cwd=tmp_path)  # outside the repository: the installed tools
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("usage: "), result.stdout[:200]
    if command in TOOL_OF:  # the same parser as the script's
        script = subprocess.run([sys.executable, str(REPO / "tools" / f"{TOOL_OF[command]}.py"), "--help"],
                                env=env_for(), capture_output=True, text=True, timeout=120)  # fmt: skip
        assert result.stdout.split("options:")[1] == script.stdout.split("options:")[1]  # usage: names differ


def test_console_script_is_installed():
    exe = shutil.which("mks2")
    assert exe, "the mks2 console script is not on PATH (pip install -e . installs it)"
    result = subprocess.run([exe, "--help"], env=env_for(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and all(name in result.stdout for name in COMMANDS)


def test_unknown_command_suggests_the_closest():
    result = mks2("pretokenise")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("did you mean 'pretokenize'?")


def test_plot_draws_a_run(tmp_path):
    records = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3} for s in range(1, 21)]
    for r in records[4::5]:
        r["eval_loss"] = r["loss"] + 0.2
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    png = tmp_path / "curves.png"
    result = mks2("plot", str(tmp_path), "-o", str(png))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 panels" in result.stdout and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_converter_reports_human_units():
    from mks2._tools.convert_to_hf import human_bytes

    assert [human_bytes(n) for n in (812, 3_500_000, 13 * 2**30 + 2**29)] == ["812 B", "3.3 MiB", "13.5 GiB"]


def test_evaluate_checks_its_files_before_loading_a_model(tmp_path):
    model = tmp_path / "export"
    model.mkdir()  # exists, but holds no model: a load would fail with another message
    result = mks2("evaluate", str(model), "--mc", str(tmp_path / "mc.jsonl"), "demo:eval_mc", "--open", "o.jsonl")
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: evaluation file not found: --mc {tmp_path / 'mc.jsonl'}, --open o.jsonl"
