"""resolve(cfg): placeholders -> paths; the locked, resumable build logic of ensure_built."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from mks2 import load_config
from mks2.demo import build_dir_name, resolve, resolve_path
from mks2.demo import builder as demo_build


def test_resolve_replaces_every_placeholder(demo_cache, demo_root):
    cfg = load_config(None, [f"data.cache_dir={demo_cache}"])
    out = resolve(cfg, progress=False)
    assert out.data.datasets[0].path == str(demo_root / "shards" / "captions")
    assert out.data.eval_datasets[0].path == str(demo_root / "shards" / "captions_heldout")
    assert out.data.tokenizer == str(demo_root / "tokenizer")
    assert out.model.vision.path == str(demo_root / "vision")
    assert out.data.image_root == str(demo_root / "images")
    for p in (out.data.datasets[0].path, out.data.tokenizer, out.model.vision.path, out.data.image_root):
        assert Path(p).exists()
    # the input config is left as it was
    assert cfg.data.datasets[0].path == "demo:captions" and cfg.data.tokenizer == "demo"
    assert cfg.model.vision.path == "demo" and cfg.data.image_root is None


def test_resolve_stage2_mix_follows_the_chat_template_and_keeps_weights(demo_cache, demo_root):
    overrides = [
        f"data.cache_dir={demo_cache}",
        "data.datasets=[{path: 'demo:text_sft', weight: 2.0}, {path: 'demo:mm_sft', weight: 1.0}]",
        "data.eval_datasets=[demo:captions_heldout]",
        "data.chat_template=vicuna_v1",
        "data.image_root=/somewhere/else",
    ]
    out = resolve(load_config(None, overrides), progress=False)
    assert [d.path for d in out.data.datasets] == [
        str(demo_root / "shards" / "text_sft-vicuna_v1"),
        str(demo_root / "shards" / "mm_sft-vicuna_v1"),
    ]
    assert [d.weight for d in out.data.datasets] == [2.0, 1.0]
    assert out.data.image_root == "/somewhere/else"  # an explicit image root is kept
    manifest = json.loads((Path(out.data.datasets[0].path) / "manifest.json").read_text())
    assert manifest["params"]["chat_template"] == "vicuna_v1"


def test_resolve_without_placeholders_is_a_no_op_and_builds_nothing(tmp_path):
    cache = tmp_path / "cache"
    cfg = load_config(
        None,
        [
            f"data.cache_dir={cache}",
            "data.datasets=[/data/a]",
            "data.eval_datasets=[]",
            "data.tokenizer=/tok",
            "model.vision.path=/vis",
        ],
    )
    assert resolve(cfg) is cfg
    assert not cache.exists()


def test_unknown_demo_name_is_a_clear_error_before_building(tmp_path):
    cfg = load_config(None, [f"data.cache_dir={tmp_path / 'cache'}", "data.datasets=[demo:captionz]"])
    with pytest.raises(ValueError, match=r"demo:captionz.*known: demo:captions"):
        resolve(cfg)
    with pytest.raises(ValueError, match="unknown demo name 'demo:nope'"):
        resolve_path("demo:nope", tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_resolve_path_for_command_line_tools(demo_cache, demo_root):
    assert resolve_path("demo:eval_mc", demo_cache) == str(demo_root / "eval" / "mc_heldout.jsonl")
    assert resolve_path("demo:mm_sft", demo_cache, chat_template="vicuna_v1").endswith("mm_sft-vicuna_v1")
    assert resolve_path("/plain/path.jsonl", demo_cache) == "/plain/path.jsonl"


def test_cli_prints_the_paths_of_an_existing_build(demo_cache, demo_root, capsys):
    from mks2.demo.__main__ import main

    assert main(["--cache-dir", str(demo_cache), "--json", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["built"] is False and out["root"] == str(demo_root)
    assert out["paths"]["eval_retrieval"] == str(demo_root / "raw" / "captions_heldout.jsonl")


# --- ensure_built's logic with a fast stand-in for the real build (the real one: test_demo_determinism)


def _fake_build(root: Path, *, progress: bool = True, world: str = "no_leak") -> dict:
    """Stand-in for demo.build: slow enough for processes to overlap, records every call."""
    with open(root.parent / "calls.log", "a") as f:
        f.write(f"{root.name}\n")
    root.mkdir(parents=True)
    time.sleep(1.0)
    (root / "payload.txt").write_text("ok")
    (root / demo_build.MARKER).write_text("{}")
    return {}


def _ensure_in_subprocess(cache: str, queue) -> None:
    demo_build.build = _fake_build  # this process only
    root, built = demo_build.ensure_built(cache, progress=False)
    queue.put((str(root), built))


def test_concurrent_callers_build_once_and_all_get_the_result(tmp_path):
    ctx = mp.get_context("fork")  # the patched module attribute must survive into the children
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_subprocess, args=(str(tmp_path), queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(built for _, built in results) == [False, False, True]
    assert {root for root, _ in results} == {str(tmp_path / build_dir_name())}
    assert (tmp_path / "calls.log").read_text().splitlines() == [build_dir_name()]
    assert (tmp_path / build_dir_name() / "payload.txt").read_text() == "ok"


def test_an_interrupted_build_is_redone_and_a_complete_one_reused(tmp_path, monkeypatch):
    monkeypatch.setattr(demo_build, "build", _fake_build)
    partial = tmp_path / build_dir_name()
    (partial / "images").mkdir(parents=True)
    (partial / "images" / "half_written.png").write_bytes(b"\x89PNG")  # no BUILD.json: not complete
    root, built = demo_build.ensure_built(tmp_path, progress=False)
    assert built and root == partial
    assert not (root / "images").exists() and (root / demo_build.MARKER).is_file()
    assert demo_build.ensure_built(tmp_path, progress=False) == (root, False)
    assert (tmp_path / "calls.log").read_text().splitlines() == [build_dir_name()]


def test_cache_directory_name_carries_version_and_source_fingerprint():
    name = build_dir_name()
    assert name.startswith(f"demo-v{demo_build.DEMO_VERSION}-") and len(name.rsplit("-", 1)[1]) == 12
    assert demo_build.fingerprint() == demo_build.fingerprint()
