"""Data shards are verified once per node before the engine (``mks2.training.data_check``): the node's local
rank 0 hashes them, a bad shard stops the run naming it, and afterwards loaders open the verified datasets
without hashing again (in-process: a world of one, which is its node's local rank 0)."""

from __future__ import annotations

import pytest

from mks2.config import load_config
from mks2.data import dataset as dataset_mod
from mks2.data.dataset import PretokenizedDataset
from mks2.data.errors import DatasetError
from mks2.data.pretokenize import pretokenize
from mks2.training import data_check
from tests.data.data_helpers import caption_records, train_sentencepiece, write_jsonl


@pytest.fixture()
def built(tmp_path):
    sp = train_sentencepiece(tmp_path / "sp.model")
    src = write_jsonl(tmp_path / "c.jsonl", caption_records(30, seed=3))
    out = tmp_path / "ds"
    pretokenize([str(src)], fmt="caption", tokenizer=str(sp), output=str(out), records_per_shard=10,
                on_error="skip", progress=False, check_images=False)  # fmt: skip
    return out, sp


@pytest.fixture()
def hashes(monkeypatch) -> list:
    seen: list = []
    real = dataset_mod.file_sha256
    monkeypatch.setattr(dataset_mod, "file_sha256", lambda path, *a: (seen.append(path), real(path, *a))[1])
    monkeypatch.setattr(dataset_mod, "_VERIFIED", set())
    return seen


def _cfg(built):
    path, sp = built
    return load_config(None, [f"data.datasets=[{{path: {path}}}]", "data.eval_datasets=[]", f"data.tokenizer={sp}",
                              "model.vocab_size=400"])  # fmt: skip


def test_verified_once_then_opened_without_hashing(built, hashes):
    data_check.verify_data_once_per_node(_cfg(built))
    assert len(hashes) == 3  # every shard, once
    hashes.clear()
    PretokenizedDataset(built[0])  # what the loader opens after the engine is built
    assert hashes == []


def test_a_bad_shard_stops_the_run_before_the_engine(built, hashes):
    shard = built[0] / "shard-000001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"rank 0: .*shard-000001\.arrow: sha256 .* does not match"):
        data_check.verify_data_once_per_node(_cfg(built))
    with pytest.raises(DatasetError, match="sha256"):
        PretokenizedDataset(built[0])  # not marked verified: a loader still checks it itself
