"""Undecodable images in a real 2-rank stage-1 run (deepspeed launcher, CPU/gloo): the first is skipped and
counted (images_skipped in metrics.jsonl, summed over the ranks) and training goes on; the one past
``data.max_images_skipped`` stops BOTH ranks at the end of that step with one line each naming the file
and the step, no traceback, no hang, the last checkpoint intact and its counter saved.

The two files are chosen by asking the trainer's own loaders which images they read (whatever the batch
layout is), then broken in a symlinked copy of the demo's image tree that ``data.image_root`` points to.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import pytest

from mks2 import checkpoint as ckpt
from mks2.config import load_config
from tests.launching import metrics, run, tail
from tests.tiny import TINY

pytestmark = pytest.mark.slow

ARGS = [*TINY, "train.max_steps=4", "train.save_interval=2", "data.max_images_skipped=1"]


def _images_read(cfg, rank: int, batches: int) -> list[list[str]]:
    """The image files rank ``rank`` of 2 decodes for each of its first ``batches`` batches."""
    from mks2.data.images import ImageLoader
    from mks2.training.stage1 import Stage1Task

    seen: list[str] = []
    original = ImageLoader.load

    def record(self, path, where=""):
        seen.append(self.resolve(path))
        return original(self, path, where)

    ImageLoader.load = record
    try:
        loader = Stage1Task(cfg).build_loader(cfg, dp_rank=rank, dp_size=2)
        out, it = [], iter(loader)
        for _ in range(batches):
            seen.clear()
            next(it)
            out.append(list(seen))
        return out
    finally:
        ImageLoader.load = original


def test_a_bad_image_is_skipped_and_one_past_the_cap_stops_every_rank(tmp_path, demo_cache):
    from mks2.demo import resolve

    cfg = resolve(load_config(None, [*ARGS, f"data.cache_dir={demo_cache}", f"train.save_dir={tmp_path / 'x'}"]))
    cfg.data.verify_hashes = False  # the launch verifies them; the replay only needs the order
    reads = {r: _images_read(cfg, r, 3) for r in (0, 1)}  # one batch per step here (no accumulation)
    counts = Counter(f for r in reads.values() for batch in r for f in batch)
    first = next(f for f in reads[0][0] if counts[f] == 1)  # read once in steps 1-3: in step 1, by rank 0
    third = next(f for f in reads[1][2] if counts[f] == 1)  # ... in step 3, by rank 1

    manifest = json.loads((Path(cfg.data.datasets[0].path) / "manifest.json").read_text())
    root = cfg.data.image_root or manifest["image_root"]  # the demo's image tree
    copy = tmp_path / "images"
    for dirpath, _, files in os.walk(root):
        target = copy / os.path.relpath(dirpath, root)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
            (target / name).symlink_to(os.path.join(dirpath, name))
    broken = {}
    for f in (first, third):
        link = copy / os.path.relpath(f, root)
        link.unlink()
        link.write_bytes(b"\x89PNG\r\n\x1a\n not an image any more")
        broken[f] = link

    image_root = str(copy)
    save_dir = tmp_path / "run"
    result = run("deepspeed", 2, [*ARGS, f"data.cache_dir={demo_cache}", f"data.image_root={image_root}",
                                  f"train.save_dir={save_dir}"], timeout=300)  # fmt: skip
    assert result.returncode != 0, tail(result)
    assert "Traceback" not in result.output, tail(result)
    records = metrics(save_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["images_skipped"] for r in records] == [1, 0, 1]
    assert [r["images_skipped_total"] for r in records] == [1, 1, 2]
    assert all(r["skipped"] == 0 for r in records)  # finite losses: the masked sample adds no NaN
    assert "step 1: 1 undecodable image(s) skipped" in result.output and str(broken[first]) in result.output
    stops = [line for line in result.output.splitlines() if "error: stopping at step 3: 2 undecodable images" in line]
    assert len(stops) == 2, tail(result)  # one line per rank, the same step
    assert all("data.max_images_skipped=1" in s and str(broken[third]) in s for s in stops)
    assert (save_dir / ckpt.tag_for(2) / ckpt.MARKER).is_file() and not (save_dir / ckpt.tag_for(3)).exists()
    trainer_state, _ = ckpt.read_meta(save_dir / ckpt.tag_for(2))
    assert trainer_state["loop"]["images_skipped_total"] == 1  # a resume continues the count
