"""An HF directory's own code runs only with --trust-remote-code, or when it is this package's mks2
bundle as recorded in mks2_export.json; a poisoned directory is refused before its code is imported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mks2.demo.base_lm import base_config
from mks2.eval import load_for_eval
from mks2.eval.remote_code import RemoteCodeRefused, decide_remote_code
from mks2.export.convert import export_model
from tests.export.export_helpers import run_config, tiny_model
from tests.launching import REPO, env_for

POISON = "\nimport pathlib\npathlib.Path({marker!r}).write_text('ran')\n"


@pytest.fixture(scope="module")
def mks2_export(tmp_path_factory, demo_cache):
    """A stage-2 mks2 export of a tiny model, and a tokenizer to load it with (the demo's)."""
    cfg = run_config("model.stage=mome")
    out = tmp_path_factory.mktemp("remote") / "export"
    export_model(tiny_model(cfg), cfg, out, dtype="fp32", progress=False, verify=False)
    return out, base_config([f"data.cache_dir={demo_cache}"]).data.tokenizer


def _copy(src, dst):
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return dst


def test_a_genuine_export_is_trusted_without_the_flag_and_says_so(mks2_export):
    out, tokenizer = mks2_export
    decision = decide_remote_code(out, trust_remote_code=False)
    assert decision.trust and "trusted without --trust-remote-code" in decision.note
    em = load_for_eval(out, tokenizer=tokenizer, chat_template="llama2")
    assert "this package's mks2 bundle" in em.remote_code_note


@pytest.mark.parametrize("tamper", ["modeling", "manifest", "extra_file"])
def test_a_poisoned_directory_is_refused_before_its_code_runs(mks2_export, tmp_path, tamper):
    out, tokenizer = mks2_export
    bad = _copy(out, tmp_path / "bad")
    marker = tmp_path / "PWNED"
    if tamper == "modeling":
        with open(bad / "modeling_mks2.py", "a") as f:
            f.write(POISON.format(marker=str(marker)))
    elif tamper == "manifest":
        manifest = json.loads((bad / "mks2_export.json").read_text())
        manifest["bundle"]["modeling_mks2.py"]["sha256"] = "0" * 64
        (bad / "mks2_export.json").write_text(json.dumps(manifest))
    else:
        (bad / "helper.py").write_text(POISON.format(marker=str(marker)))
    with pytest.raises(RemoteCodeRefused, match="not this package's mks2 bundle"):
        load_for_eval(bad, tokenizer=tokenizer, chat_template="llama2")
    assert decide_remote_code(bad, trust_remote_code=True).trust  # the explicit opt-in
    assert not marker.exists()


def test_evaluate_cli_refuses_a_poisoned_directory_in_one_line(mks2_export, tmp_path):
    out, tokenizer = mks2_export
    bad = _copy(out, tmp_path / "bad")
    marker = tmp_path / "PWNED"
    with open(bad / "modeling_mks2.py", "a") as f:
        f.write(POISON.format(marker=str(marker)))
    questions = tmp_path / "q.jsonl"  # a valid file: the CLI checks its inputs before the model directory
    questions.write_text(json.dumps({"question": "q1", "choices": ["red", "blue"], "answer": 0}) + "\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "evaluate.py"), str(bad), "--mc", str(tmp_path / "q.jsonl"),
         "--tokenizer", str(tokenizer)],
        cwd=REPO, env=env_for(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "modeling_mks2.py differs from this package's bundled" in output, output
    assert "--trust-remote-code" in output and "Traceback" not in output, output
    assert not marker.exists()
