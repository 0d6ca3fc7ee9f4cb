"""Nothing complete-looking after a failed, interrupted or refused export; tokenizer files load correctly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import sentencepiece as spm

import mks2.export.convert as convert_mod
from mks2.demo.tokenizer import train_sentencepiece
from mks2.export import OutputExistsError, VerificationError, export_model
from mks2.export.atomic import atomic_output_dir
from tests.export.export_helpers import run_config, tiny_model
from tests.launching import REPO


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name or ".replaced-" in p.name)


def test_injected_failure_leaves_no_output(tmp_path, monkeypatch):
    cfg = run_config("model.stage=mome")
    model = tiny_model(cfg)
    calls = []
    real = convert_mod.produce

    def failing(entry, source, scaling):
        calls.append(entry.name)
        if len(calls) == 5:
            raise RuntimeError("disk full (injected)")
        return real(entry, source, scaling)

    monkeypatch.setattr(convert_mod, "produce", failing)
    with pytest.raises(RuntimeError, match="injected"):
        export_model(model, cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []

    # With --force over an existing export, a failure keeps the old export untouched.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("old")
    calls.clear()
    with pytest.raises(RuntimeError, match="injected"):
        export_model(model, cfg, tmp_path / "out", force=True, progress=False)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["config.json"]
    assert (tmp_path / "out" / "config.json").read_text() == "old"


def test_refuses_non_empty_output_without_force(tmp_path):
    cfg = run_config("model.stage=base")
    model = tiny_model(cfg)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--force"):
        export_model(model, cfg, tmp_path / "out", verify=False, progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    export_model(model, cfg, tmp_path / "out", verify=False, force=True, progress=False)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").is_file()
    assert _leftovers(tmp_path) == []


def test_failed_verification_leaves_no_output(tmp_path, monkeypatch):
    cfg = run_config("model.stage=mome", "model.mome.router_init_std=0.5")
    model = tiny_model(cfg)
    real = convert_mod.produce

    def corrupt(entry, source, scaling):
        tensor = real(entry, source, scaling)
        return tensor + 0.5 if entry.name == "model.layers.1.mvm.down_proj.weight" else tensor

    monkeypatch.setattr(convert_mod, "produce", corrupt)
    with pytest.raises(VerificationError, match="does not reproduce ours"):
        export_model(model, cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_killed_export_leaves_nothing_complete_and_is_cleaned_up_later(tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        import mks2.export.convert as c
        from mks2.export import export_model
        from tests.export.export_helpers import run_config, tiny_model
        cfg = run_config("model.stage=mome")
        model = tiny_model(cfg)
        real = c.produce
        def slow(entry, source, scaling):
            print("writing", entry.name, flush=True)
            time.sleep(0.5)
            return real(entry, source, scaling)
        c.produce = slow
        export_model(model, cfg, {str(out)!r}, verify=False, progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until it is writing tensors, then kill -9
            line = proc.stdout.readline()
            if line.startswith("writing") or not line:
                break
        assert line.startswith("writing"), "the export never started"
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert not out.exists()  # nothing at the output path
    partial = _leftovers(tmp_path)
    assert len(partial) == 1 and partial[0].startswith(".out.partial-")  # hidden, named as unfinished
    cfg = run_config("model.stage=mome")
    export_model(tiny_model(cfg), cfg, out, verify=False, progress=False)
    assert (out / "config.json").is_file() and _leftovers(tmp_path) == []  # the stale one was removed


def test_atomic_dir_on_keyboard_interrupt(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(tmp_path / "x") as tmp:
            (tmp / "config.json").write_text("{}")
            raise KeyboardInterrupt
    assert not (tmp_path / "x").exists() and _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    text = ["the red cube sits left of a blue ball", "a green pyramid, small and shiny", "numbers 12 and 345"] * 40
    (d / "sp.model").write_bytes(train_sentencepiece(text, vocab_size=300, pad_id=3))
    return d / "sp.model"


def test_sentencepiece_tokenizer_exports_and_loads_with_autotokenizer(tmp_path, sp_model):
    from transformers import AutoTokenizer

    cfg = run_config("model.stage=base", f"data.tokenizer={sp_model}", "model.vocab_size=300")
    export_model(tiny_model(cfg), cfg, tmp_path / "out", verify=False, progress=False)
    out = tmp_path / "out"
    assert {"tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"} <= {p.name for p in out.iterdir()}
    tok = AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    for text in ["the red cube", "a green pyramid, small and shiny 12", "ünïcode bytes ✓"]:
        assert tok(text, add_special_tokens=False).input_ids == sp.encode(text), text
        assert tok(text).input_ids == [1, *sp.encode(text)]  # BOS added, as Llama's tokenizer does
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))
    gen = (out / "generation_config.json").read_text()
    assert '"bos_token_id": 1' in gen and '"eos_token_id": 2' in gen and '"pad_token_id": 3' in gen
