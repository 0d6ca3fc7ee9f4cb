"""HF Llama weights loaded under ``deepspeed.zero.Init`` (through ``GatheredParameters``, parameters
partitioned over 2 ranks) give exactly the model that plain loading gives: same losses as the same
run with ZeRO-1 (no zero.Init), step for step. Under ZeRO-3 only rank 0 reads the weights: the other rank
reads the safetensors header alone (bytes counted per rank by ``scripts/io_probe``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.fixtures import make_tiny_llama
from tests.launching import metrics, run, tail
from tests.tiny import TINY

pytestmark = pytest.mark.slow
PROBE = Path(__file__).parent / "scripts" / "io_probe"


def test_zero3_partitioned_loading_matches_plain_loading(tmp_path):
    hf_dir = tmp_path / "llama"
    # Demo vocabulary (1024) and a seq_len-compatible context; the architecture comes from config.json.
    make_tiny_llama(hf_dir, vocab_size=1024, max_position_embeddings=128)
    losses = {}
    for stage in (3, 1):
        save_dir = tmp_path / f"zero{stage}"
        args = [*TINY, f"model.init_from={hf_dir}", f"parallel.zero_stage={stage}", "train.max_steps=2"]
        probe = tmp_path / f"io{stage}"
        probe.mkdir()
        env = {
            "PYTHONPATH": os.pathsep.join([str(PROBE), os.environ.get("PYTHONPATH", "")]),
            "MKS2_IO_PROBE_DIR": str(hf_dir),
            "MKS2_IO_PROBE_OUT": str(probe),
        }
        result = run("deepspeed", 2, [*args, "train.save_interval=0", f"train.save_dir={save_dir}"], env=env)
        assert result.returncode == 0, tail(result)
        read = {r: json.loads((probe / f"rank_{r}.json").read_text()) for r in (0, 1)}
        weights = str(hf_dir / "model.safetensors")
        size = (hf_dir / "model.safetensors").stat().st_size
        assert read[0][weights] >= size * 0.9, read  # rank 0 reads the weights (once)
        if stage == 3:
            assert read[1][weights] <= size * 0.05, read  # rank 1: the header only
        recs = metrics(save_dir)
        losses[stage] = [(r["loss_caption"], r["loss_retrieval"]) for r in recs]
    for (c3, r3), (c1, r1) in zip(losses[3], losses[1]):
        assert abs(c3 - c1) <= 1e-5 * abs(c1) and abs(r3 - r1) <= 1e-5 * abs(r1), losses
    # The architecture came from the HF config.json (intermediate 88), not from the overrides (64).
    saved = (tmp_path / "zero3" / "step_00000002" / "mks2" / "config.json").read_text()
    assert '"intermediate_size": 88' in saved and f'"init_from": "{hf_dir}"' in saved
