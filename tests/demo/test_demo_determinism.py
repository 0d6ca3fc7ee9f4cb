"""A second real build (two CLI processes racing for it) is byte-identical to the session's build."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mks2.demo import build_dir_name


def _digests(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``; shard manifests normalised for what legitimately differs
    between two builds (their absolute paths and the pretokenizer's elapsed seconds)."""
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "manifest.json":
            manifest = json.loads(data.decode().replace(str(root), "<ROOT>"))
            manifest.pop("seconds")
            data = json.dumps(manifest, sort_keys=True).encode()
        out[str(path.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


@pytest.mark.slow
def test_two_racing_processes_build_once_and_the_build_is_deterministic(tmp_path, demo_root):
    cache = tmp_path / "second"
    env = {**os.environ, "PYTHONHASHSEED": "123"}  # nothing may depend on hash randomisation
    cmd = [sys.executable, "-m", "mks2.demo", "--cache-dir", str(cache), "--json", "--quiet"]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)
    ]
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(stdout))
    assert sorted(o["built"] for o in outs) == [False, True]  # one built, the other waited and reused
    root = cache / build_dir_name()
    assert {o["root"] for o in outs} == {str(root)}
    assert sorted(p.name for p in cache.iterdir()) == [f".{root.name}.lock", root.name]  # nothing stray

    first, second = _digests(demo_root), _digests(root)
    assert first.keys() == second.keys()
    differing = [name for name in first if first[name] != second[name]]
    assert not differing, differing[:10]
    assert len(first) > 4000  # images, shards, tokenizer, tower, raw and eval files
