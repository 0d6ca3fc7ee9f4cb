"""Collation: image prefix expansion, labels, packing isolation, retrieval view, truncation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mks2.data.collate import Collator, attention_allowed

IMG = -200


def _sample(ids, mask=None, image=None):
    ids = np.asarray(ids, dtype=np.int32)
    mask = np.asarray(mask if mask is not None else [0] + [1] * (len(ids) - 1), dtype=np.int8)
    return {"input_ids": ids, "loss_mask": mask, "pixel_values": image}


def _pix(value):
    return torch.full((3, 4, 4), float(value))


def test_padding_rows():
    c = Collator(seq_len=8, pad_id=0)
    batch = c([[_sample([1, 10, 11, 2])], [_sample([1, 12, 2], mask=[0, 0, 1])]])
    assert set(batch) == {"input_ids", "labels", "position_ids", "segment_ids"}
    assert batch["input_ids"].dtype == torch.long and batch["segment_ids"].dtype == torch.int32
    assert batch["input_ids"].tolist() == [[1, 10, 11, 2, 0, 0, 0, 0], [1, 12, 2, 0, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 10, 11, 2, -100, -100, -100, -100], [-100, -100, 2] + [-100] * 5]
    assert batch["position_ids"].tolist()[1] == [0, 1, 2, 0, 0, 0, 0, 0]
    assert batch["segment_ids"].tolist()[0] == [1, 1, 1, 1, 0, 0, 0, 0]


def test_packing_never_attends_across_documents():
    rng = np.random.default_rng(0)
    docs = [[1, *rng.integers(3, 50, size=n).tolist(), 2] for n in (3, 0, 6, 2)]
    c = Collator(seq_len=24)
    batch = c([[_sample(d) for d in docs]])
    seg, pos, ids = batch["segment_ids"][0], batch["position_ids"][0], batch["input_ids"][0]
    # each document occupies its own segment, positions restart at 0
    start = 0
    for k, d in enumerate(docs, start=1):
        span = slice(start, start + len(d))
        assert ids[span].tolist() == d and (seg[span] == k).all()
        assert pos[span].tolist() == list(range(len(d)))
        assert batch["labels"][0, start] == -100  # a document's first label (BOS): no loss across the boundary
        start += len(d)
    assert (seg[start:] == 0).all() and (batch["labels"][0, start:] == -100).all()
    allowed = attention_allowed(batch["segment_ids"])[0]
    doc_of = seg.tolist()
    for q in range(24):
        for k in range(24):
            same_doc = doc_of[q] == doc_of[k] != 0
            assert bool(allowed[q, k]) == (same_doc and k <= q), (q, k)


def test_image_prefix_expansion_and_pixel_order():
    c = Collator(seq_len=16, num_prefix_tokens=3)
    rows = [
        [_sample([1, IMG, 10, 2], mask=[0, 0, 1, 1], image=_pix(1)), _sample([1, 20, 2])],
        [_sample([1, IMG, 30, 31, 2], mask=[0, 0, 1, 1, 1], image=_pix(2))],
    ]
    batch = c(rows)
    assert batch["input_ids"][0, :9].tolist() == [1, IMG, IMG, IMG, 10, 2, 1, 20, 2]
    assert batch["labels"][0, :9].tolist() == [-100, -100, -100, -100, 10, 2, -100, 20, 2]
    assert batch["segment_ids"][0, :10].tolist() == [1] * 6 + [2] * 3 + [0]
    assert batch["position_ids"][0, :9].tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2]
    assert batch["pixel_values"].shape == (2, 3, 4, 4)
    assert batch["pixel_values"][:, 0, 0, 0].tolist() == [1.0, 2.0]  # row-major order of placeholders
    assert (batch["input_ids"] == IMG).sum() == 3 * batch["pixel_values"].shape[0]


def test_retrieval_view():
    P = 4
    c = Collator(seq_len=12, num_prefix_tokens=P, retrieval=True, eos_id=2)
    batch = c([[_sample([1, IMG, 10, 11, 2], image=_pix(0))], [_sample([1, IMG, 12, 2], image=_pix(1))]])
    S_r = 12 - P + 1
    assert batch["ret_input_ids"].shape == (2, S_r)
    assert batch["ret_input_ids"].tolist() == [[1, 10, 11, 2] + [0] * 5, [1, 12, 2] + [0] * 6]
    assert batch["ret_eos_index"].tolist() == [3, 2]
    assert batch["ret_segment_ids"].tolist()[1] == [1, 1, 1] + [0] * 6
    assert batch["ret_position_ids"].tolist()[0][:4] == [0, 1, 2, 3]
    # a caption longer than the view keeps its final EOS
    long = c([[_sample([1, IMG, *range(10, 30), 2], image=_pix(0))]])
    assert long["ret_input_ids"][0, -1] == 2 and long["ret_eos_index"].tolist() == [S_r - 1]
    with pytest.raises(ValueError, match="exactly one captioned image per row"):
        c([[_sample([1, 10, 2])]])


def test_truncation_rules():
    c = Collator(seq_len=6, num_prefix_tokens=3)
    batch = c([[_sample([1, 5, 6, 7, 8, 9, 10, 2])]])
    assert batch["input_ids"][0].tolist() == [1, 5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="cuts through an image prefix"):
        c([[_sample([1, 5, 6, 7, IMG, 2], image=_pix(0))]])  # the prefix would span positions 4..6
    dropped = c([[_sample([1, 5, 6, 7, 8, 9, IMG, 2], image=_pix(0))]])  # the image lies past seq_len
    assert "pixel_values" not in dropped and (dropped["input_ids"] != IMG).all()


def test_placeholder_needs_an_image():
    c = Collator(seq_len=8, num_prefix_tokens=2)
    with pytest.raises(ValueError, match="1 image placeholder"):
        c([[_sample([1, IMG, 5, 2])]])
    with pytest.raises(ValueError, match="num_prefix_tokens is 0"):
        Collator(seq_len=8)([[_sample([1, IMG, 5, 2], image=_pix(0))]])
    with pytest.raises(ValueError, match="cannot hold an image prefix"):
        Collator(seq_len=4, num_prefix_tokens=4)
