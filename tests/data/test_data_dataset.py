"""PretokenizedDataset: manifest checks, memory-mapped random access."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pytest

from mks2.data.dataset import PretokenizedDataset
from mks2.data.errors import DatasetError
from mks2.data.pretokenize import pretokenize
from tests.data.data_helpers import caption_records, train_sentencepiece, write_jsonl


@pytest.fixture()
def built(tmp_path, sp_model):
    recs = caption_records(60, seed=5)
    recs.append({"image": None, "caption": "x"})  # skipped: images are required for captions
    src = write_jsonl(tmp_path / "c.jsonl", recs)
    out = tmp_path / "ds"
    pretokenize(
        [str(src)],
        fmt="caption",
        tokenizer=str(sp_model),
        output=str(out),
        records_per_shard=25,
        on_error="skip",
        progress=False,
        check_images=False,  # the records name images that are not on disk
    )
    return out


def _pyarrow_rows(directory):
    rows = []
    for shard in json.loads((directory / "manifest.json").read_text())["shards"]:
        rows += pa.ipc.open_stream(pa.OSFile(str(directory / shard["file"]))).read_all().to_pylist()
    return rows


@pytest.mark.parametrize("access", ["read", "view"])
def test_random_access_matches_pyarrow(built, sp_model, access):
    ds = PretokenizedDataset(built, tokenizer=sp_model, vocab_size=400, image_token_id=-200, access=access)
    rows = _pyarrow_rows(built)
    assert len(ds) == len(rows) == 60 and ds.kind == "caption" and ds.has_images
    for i in np.random.default_rng(0).permutation(len(ds)):
        s = ds[int(i)]
        assert s["input_ids"].dtype == np.int32 and s["loss_mask"].dtype == np.int8
        assert s["input_ids"].tolist() == rows[i]["input_ids"]
        assert s["loss_mask"].tolist() == rows[i]["loss_mask"]
        assert s["image"] == rows[i]["image"]
        assert ds.length(int(i)) == len(rows[i]["input_ids"]) and ds.has_image(int(i))
        if access == "view":  # zero-copy views into the read-only mapping
            assert not s["input_ids"].flags.owndata and not s["input_ids"].flags.writeable
    with pytest.raises(IndexError):
        ds[60]


def test_nullable_image_column(tmp_path, sp_model):
    recs = [
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"image": "x/1.png", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "b"}]},
    ] * 5
    src = write_jsonl(tmp_path / "l.jsonl", recs)
    pretokenize(
        [str(src)],
        fmt="llava",
        tokenizer=str(sp_model),
        output=str(tmp_path / "ds"),
        records_per_shard=3,
        progress=False,
        check_images=False,  # the records name images that are not on disk
    )
    for access in ("read", "view"):
        ds = PretokenizedDataset(tmp_path / "ds", access=access)
        assert [ds[i]["image"] for i in range(10)] == [None, "x/1.png"] * 5
        assert [ds.has_image(i) for i in range(10)] == [False, True] * 5


def test_page_release_keeps_data_correct(built):
    ds = PretokenizedDataset(built, access="view", release_every=256)  # release after every couple of rows
    first = [ds[i]["input_ids"].copy() for i in range(len(ds))]
    again = [ds[i]["input_ids"].copy() for i in reversed(range(len(ds)))][::-1]
    assert all((a == b).all() for a, b in zip(first, again))


def test_pickle_reopens(built):
    ds = PretokenizedDataset(built)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.access == "read"
    assert clone[7]["input_ids"].tolist() == ds[7]["input_ids"].tolist() and clone[7]["image"] == ds[7]["image"]


def test_flipped_byte_names_the_shard(built):
    shard = built / "shard-000001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=r"shard-000001\.arrow: sha256 .* does not match the manifest"):
        PretokenizedDataset(built)
    PretokenizedDataset(built, verify_hashes=False)  # the explicit opt-out skips hashing


def test_truncated_or_missing_shard(built):
    shard = built / "shard-000002.arrow"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(DatasetError, match=r"shard-000002\.arrow: \d+ bytes but the manifest records"):
        PretokenizedDataset(built, verify_hashes=False)
    shard.unlink()
    with pytest.raises(DatasetError, match=r"shard-000002\.arrow: shard listed in the manifest is missing"):
        PretokenizedDataset(built, verify_hashes=False)


def test_no_manifest_is_not_a_dataset(built):
    (built / "manifest.json").unlink()
    with pytest.raises(DatasetError, match="no manifest.json"):
        PretokenizedDataset(built)
    (built / ".pretokenize").mkdir()
    with pytest.raises(DatasetError, match="re-run it with --resume"):
        PretokenizedDataset(built)


def test_tokenizer_and_model_mismatches(built, tmp_path, sp_model):
    other = train_sentencepiece(tmp_path / "other.model", vocab_size=380, seed=1)
    with pytest.raises(DatasetError, match="fingerprint"):
        PretokenizedDataset(built, tokenizer=other)
    with pytest.raises(DatasetError, match="vocabulary has 400 ids but model.vocab_size is 300"):
        PretokenizedDataset(built, vocab_size=300)
    with pytest.raises(DatasetError, match="image placeholder id -200 but model.vision.image_token_id is -1"):
        PretokenizedDataset(built, image_token_id=-1)
    PretokenizedDataset(built, tokenizer=sp_model, vocab_size=400, image_token_id=-200)


def test_token_ids_are_scanned(built):
    """With hashes verified the ids themselves are checked, not only the manifest's claim."""
    manifest = json.loads((built / "manifest.json").read_text())
    true_max = manifest["max_token_id"]
    manifest["max_token_id"], manifest["vocab_size"] = 3, 4  # a manifest that under-reports
    (built / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=rf"shard-00000\d\.arrow: token id {true_max} outside \[0, model"):
        PretokenizedDataset(built, vocab_size=true_max)
    PretokenizedDataset(built, vocab_size=true_max + 1)
