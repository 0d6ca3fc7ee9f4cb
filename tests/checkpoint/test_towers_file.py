"""The zero3 checkpoint's towers file (``mks2.checkpoint.towers``): what rank 0 writes from its replicated
towers is read back bit for bit, in their dtype, under our names, and merged with the engine's tensors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mks2.checkpoint import CheckpointError, ModuleSource, open_towers, save_towers
from mks2.checkpoint.tensors import CombinedSource


class _FrontEnd(nn.Module):
    """A front-end's shape: towers (a bf16 linear, an fp32 buffer, an int64 buffer) and a mapping."""

    def __init__(self):
        super().__init__()
        self.vision_model = nn.Linear(3, 5, dtype=torch.bfloat16)
        self.register_buffer("scale", torch.randn(7))
        self.register_buffer("ids", torch.arange(4))
        self.mapping = nn.Linear(5, 2)


def test_towers_round_trip_bit_for_bit_and_merge_with_the_engine_tensors(tmp_path):
    torch.manual_seed(0)
    fe = _FrontEnd()
    save_towers(tmp_path, fe)
    towers = open_towers(tmp_path, prefix="model.")
    assert towers is not None and set(towers.meta) == {
        "model.vision.vision_model.weight", "model.vision.vision_model.bias", "model.vision.scale",
        "model.vision.ids",
    }  # fmt: skip
    for name, t in fe.state_dict().items():
        if name.startswith("mapping."):
            continue
        got = towers.get(f"model.vision.{name}")
        assert got.dtype == t.dtype and torch.equal(got, t), name
    engine = ModuleSource(nn.ModuleDict({"model": nn.ModuleDict({"vision": nn.ModuleDict({"mapping": fe.mapping})})}))
    both = CombinedSource(engine, towers)
    assert set(both.meta) == set(engine.meta) | set(towers.meta)
    assert torch.equal(both.get("model.vision.mapping.weight"), fe.mapping.weight)
    with pytest.raises(ValueError, match="in both"):
        CombinedSource(towers, open_towers(tmp_path, prefix="model."))
    assert open_towers(tmp_path / "elsewhere") is None  # pipeline / older zero3 checkpoints: none


def test_a_truncated_towers_file_is_a_checkpoint_error(tmp_path):
    path = save_towers(tmp_path, _FrontEnd())
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="vision_towers.safetensors"):
        open_towers(tmp_path)
