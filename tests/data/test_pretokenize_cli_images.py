"""tools/pretokenize.py checks images by default for image kinds: a missing image stops it naming
file:line; --no-check-images skips the check."""

from __future__ import annotations

import subprocess
import sys

from tests.data.data_helpers import caption_records, write_images, write_jsonl
from tests.launching import REPO


def test_missing_image_is_refused_by_default_and_accepted_with_no_check_images(tmp_path, sp_model):
    write_images(tmp_path / "root", 3)
    src = write_jsonl(tmp_path / "c.jsonl", caption_records(4))  # img/0..3.png: the fourth is missing
    cmd = [sys.executable, str(REPO / "tools/pretokenize.py"), "--input", str(src), "--format", "caption",
           "--tokenizer", str(sp_model), "--image-root", str(tmp_path / "root"), "--no-progress"]  # fmt: skip
    refused = subprocess.run([*cmd, "--output", str(tmp_path / "o1")], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert f"{src}:4: image not found" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    skipped = subprocess.run(
        [*cmd, "--output", str(tmp_path / "o2"), "--no-check-images"], capture_output=True, text=True, timeout=120
    )
    assert skipped.returncode == 0, skipped.stderr
    assert "4 records read, 4 written" in skipped.stdout
