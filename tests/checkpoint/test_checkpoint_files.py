"""The checkpoint package's files and rules, single process: find (resume, explicit tags, checkpoint
directories), retention, per-rank RNG state, config-compatibility messages."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mks2 import checkpoint as ckpt
from mks2.config import load_config, to_dict


def _fake_ckpt(root, step, complete=True):
    d = root / ckpt.tag_for(step)
    (d / "mks2").mkdir(parents=True)
    (d / "weights.bin").write_text("x")
    if complete:
        ckpt.mark_complete(root, d)
    return d


def test_find_resume_ignores_incomplete_and_explains(tmp_path):
    assert ckpt.find_resume(tmp_path, "auto") is None
    with pytest.raises(ckpt.CheckpointError, match="train.resume=require but .* holds no complete checkpoint"):
        ckpt.find_resume(tmp_path, "require")
    _fake_ckpt(tmp_path, 5)
    _fake_ckpt(tmp_path, 10)
    _fake_ckpt(tmp_path, 15, complete=False)
    assert ckpt.find_resume(tmp_path, "auto").step == 10
    assert ckpt.find_resume(tmp_path, "require").tag == "step_00000010"
    assert ckpt.find_resume(tmp_path, "5").step == 5
    assert ckpt.find_resume(tmp_path, "none") is None
    with pytest.raises(ckpt.CheckpointError, match="is incomplete"):
        ckpt.find_resume(tmp_path, "step_00000015")
    with pytest.raises(
        ckpt.CheckpointError, match="no checkpoint step_00000020 .*complete ones: step_00000005, step_00000010"
    ):
        ckpt.find_resume(tmp_path, "20")


def test_prune_keeps_last_k_and_drops_stale_partials(tmp_path):
    for s in (5, 10, 15):
        _fake_ckpt(tmp_path, s)
    _fake_ckpt(tmp_path, 12, complete=False)  # interrupted save older than the newest complete one
    _fake_ckpt(tmp_path, 20, complete=False)  # maybe being written: kept
    deleted = ckpt.prune(tmp_path, keep_last=2)
    assert sorted(deleted) == ["step_00000005", "step_00000012"]
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["latest", "step_00000010", "step_00000015", "step_00000020"]
    assert (tmp_path / "latest").read_text() == "step_00000015"


def test_rng_state_round_trip_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    ckpt.save_rank_state(tmp_path, 0, {"consumed": 7})
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = ckpt.load_rank_state(tmp_path, 0)  # weights_only load
    ckpt.set_rng_state(state["rng"])
    assert state["loader"] == {"consumed": 7}
    got = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert got[:3] == expected[:3] and torch.equal(got[3], expected[3])
    with pytest.raises(ckpt.CheckpointError, match="rank_00001.pt is missing"):
        ckpt.load_rank_state(tmp_path, 1)


def test_shape_changes_name_the_keys():
    a = to_dict(load_config(None, []))
    b = to_dict(load_config(None, ["model.hidden_size=128", "model.mvm.placement=parallel", "train.lr=0.1"]))
    changes = ckpt.shape_changes(a, b)
    assert any(c.startswith("model.hidden_size: checkpoint 64, now 128") for c in changes)
    assert any(c.startswith("model.mvm.placement") for c in changes)
    assert not any("train.lr" in c for c in changes)  # not a shape key
    c = to_dict(load_config(None, ["model.num_kv_heads=null", "model.num_heads=4"]))
    d = to_dict(load_config(None, ["model.num_kv_heads=4"]))
    assert ckpt.shape_changes(c, d) == []  # None means num_heads


def test_find_takes_a_save_dir_a_tag_or_a_checkpoint_directory(tmp_path):
    _fake_ckpt(tmp_path, 5)
    ten = _fake_ckpt(tmp_path, 10)
    partial = _fake_ckpt(tmp_path, 15, complete=False)
    assert ckpt.find(tmp_path).path == ten  # newest complete, the partial one ignored
    assert ckpt.find(tmp_path, 5).tag == ckpt.find(tmp_path, "step_00000005").tag == "step_00000005"
    assert ckpt.find(ten).path == ten and ckpt.find(ten).step == 10
    with pytest.raises(ckpt.CheckpointError, match=r"^some.key: .*step_00000015 is not a complete checkpoint"):
        ckpt.find(partial, key="some.key")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.find(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ckpt.CheckpointError, match="is not a directory"):
        ckpt.find(tmp_path / "file.txt")


def test_checkpoint_errors_are_user_errors():
    from mks2.errors import UserError

    assert issubclass(ckpt.CheckpointError, UserError) and issubclass(ckpt.PipelineLayoutError, ckpt.CheckpointError)
