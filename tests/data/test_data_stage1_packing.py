"""Packed stage-1 micro-batches (mks2.data.stage1_packing): the step plan, the collated layout (segments,
positions, labels, EOS indices, image order, the model's mask) and exact resume of the step sampler."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mks2.constants import IGNORE_INDEX
from mks2.data.collate import attention_allowed
from mks2.data.sampler import SampleStream
from mks2.data.stage1_packing import (
    CaptionTooLongError,
    PackedPairCollator,
    PackedStepSampler,
    StepHeader,
    max_caption_view,
    plan_step,
    view_lengths,
)
from mks2.model.modeling import positions_from_segments

IMG, BOS, EOS, P, S = -200, 1, 2, 3, 16


def caption(n: int, first: int = 10) -> dict:
    """A pretokenized caption record <s> <image> n tokens </s> with a recognisable 'image' tensor."""
    ids = np.array([BOS, IMG, *range(first, first + n), EOS], dtype=np.int32)
    mask = np.array([0, 0] + [1] * (n + 1), dtype=np.int8)
    return {"input_ids": ids, "loss_mask": mask, "pixel_values": torch.full((3, 2, 2), float(first))}


def test_view_lengths_and_truncation_keep_eos():
    v = view_lengths(3 + 5, num_prefix_tokens=P, max_caption=S)  # 5 caption tokens
    assert (v.caption, v.retrieval, v.labels, v.truncated) == (1 + P + 5 + 1, 1 + 5 + 1, 6, False)
    long = view_lengths(3 + 40, num_prefix_tokens=P, max_caption=S)
    assert (long.caption, long.retrieval, long.labels, long.truncated) == (S, S - P, S - 1 - P, True)
    assert max_caption_view(S, 1, P) == (S + P) // 2  # one row must hold both views


def test_plan_balances_bins_and_carries_what_does_not_fit():
    views = [view_lengths(3 + n, num_prefix_tokens=P, max_caption=S) for n in (2, 2, 2, 2)]  # pairs of 7 + 4
    samples = [(0, i) for i in range(4)]
    bins, carried = plan_step(samples, views, bins=2, rows=2, seq_len=S)
    assert [len(b) for b in bins] == [2, 2] and carried == []  # least-filled bin first: 0, 1, 0, 1
    assert [s.index for s in bins[0]] == [0, 2]
    for b in bins:  # both views of a pair inside one row each, no overlap, within the row
        spans = [(s.cap_row, s.cap_start, s.cap_len) for s in b] + [(s.ret_row, s.ret_start, s.ret_len) for s in b]
        cover = np.zeros((2, S), dtype=int)
        for r, c, n in spans:
            assert c + n <= S
            cover[r, c : c + n] += 1
        assert cover.max() == 1
    bins, carried = plan_step(samples, views, bins=1, rows=2, seq_len=S)  # 4 pairs x 11 tokens > 32
    assert len(bins[0]) == 2 and carried == [2, 3]


def test_collated_layout_segments_positions_labels_eos_and_images():
    views = [view_lengths(3 + n, num_prefix_tokens=P, max_caption=S) for n in (4, 2, 20)]
    bins, carried = plan_step([(0, 0), (0, 1), (0, 2)], views, bins=1, rows=4, seq_len=S)
    assert carried == []
    records = [caption(4, 10), caption(2, 20), caption(20, 30)]
    collate = PackedPairCollator(seq_len=S, rows=4, num_prefix_tokens=P, image_token_id=IMG, pad_id=0, eos_id=EOS)
    items = [StepHeader(caption_tokens=99, pairs=3, micro_batches=1)]
    items += [{**records[s.index], "slot": s} for s in bins[0]]
    batch = collate(items)
    ids, seg, pos, labels = batch["input_ids"], batch["segment_ids"], batch["position_ids"], batch["labels"]
    assert ids.shape == (4, S) and batch["step_caption_tokens"].item() == 99
    assert torch.equal(pos, positions_from_segments(seg))  # positions restart in every segment
    assert int((ids == IMG).sum()) == 3 * P
    # images in the row-major order of their caption views: what embed_inputs splices prefixes by
    img_pos = torch.nonzero((ids == IMG).reshape(-1)).flatten()[::P]
    owners = [int(batch["pixel_values"][k, 0, 0, 0]) for k in range(3)]
    starts = {10: None, 20: None, 30: None}
    for first in starts:
        hit = torch.nonzero(ids.reshape(-1) == first).flatten()
        starts[first] = hit.tolist()
    for k, p in enumerate(img_pos.tolist()):
        assert p + P in starts[owners[k]]  # the caption that follows image k's prefix is image k's caption
    # retrieval EOS of pair k: an EOS ending a segment without image tokens, holding pair k's caption
    flat_ids, flat_seg = ids.reshape(-1), seg.reshape(-1)
    for k, e in enumerate(batch["ret_eos_flat"].tolist()):
        assert flat_ids[e] == EOS
        same = (flat_seg == flat_seg[e]) & (torch.arange(flat_ids.numel()) // S == e // S)
        text = flat_ids[same]
        assert text[0] == BOS and IMG not in text.tolist() and text[1] == owners[k]
    # the long caption was truncated with its EOS kept: its caption view fills a row
    long_row = [r for r in range(4) if (ids[r] == 30).any() and (ids[r] == IMG).any()][0]
    cap = ids[long_row][seg[long_row] == seg[long_row][ids[long_row] == IMG][0]]
    assert len(cap) == S and cap[-1] == EOS
    # labels: caption tokens + EOS of caption views only; the loss never predicts across segments
    assert int((labels != IGNORE_INDEX).sum()) == sum(v.labels for v in views)
    allowed = attention_allowed(seg)
    for r in range(4):
        for q in range(S):
            for k in range(S):
                if allowed[r, q, k]:
                    assert seg[r, q] == seg[r, k] and k <= q and seg[r, q] > 0


def _sampler(state=None, *, rank=0, world=2, refuse=False, lengths=None):
    lengths = lengths if lengths is not None else [3 + (i * 7) % 11 for i in range(50)]
    s = PackedStepSampler(SampleStream([50], seed=3), rank=rank, world_size=world, grad_accumulation_steps=2,
                          captions_per_step=8, rows=2, seq_len=S, num_prefix_tokens=P,
                          length=lambda d, i: lengths[i], where=lambda d, i: f"shard.arrow row {i}",
                          refuse_long=refuse)  # fmt: skip
    if state is not None:
        s.load_state_dict(state)
    return s


def test_step_sampler_is_global_deterministic_and_resumes_exactly():
    def steps(sampler, n):
        it, out = iter(sampler), []
        for _ in range(n * 2):
            mb = next(it)
            sampler.commit(1)
            out.append(mb)
        return out

    a0, a1 = _sampler(rank=0), _sampler(rank=1)
    s0, s1 = steps(a0, 3), steps(a1, 3)
    assert [m[0] for m in s0] == [m[0] for m in s1]  # the same step header on every rank
    for h in range(0, 6, 2):  # a step: 8 captions over 2 ranks x 2 micro-batches, minus carried ones
        pairs = {(p.dataset, p.index) for m in (s0[h], s0[h + 1], s1[h], s1[h + 1]) for p in m[1:]}
        assert len(pairs) == s0[h][0].pairs <= 8
    mid = _sampler(rank=0)
    steps(mid, 2)
    resumed = _sampler(mid.state_dict(), rank=0)
    assert steps(resumed, 1) == s0[4:6]
    state = a0.state_dict()
    assert state["steps"] == 3 and state["consumed_rows"] == sum(s0[h][0].pairs for h in (0, 2, 4))


def test_a_long_caption_is_refused_with_its_file_and_row():
    lengths = [5] * 50
    lengths[4] = 60
    with pytest.raises(CaptionTooLongError, match="shard.arrow row 4"):
        for _ in zip(range(100), iter(_sampler(refuse=True, lengths=lengths))):
            pass


def test_packed_and_padded_sampler_states_refuse_each_other():
    from mks2.data.errors import DataError
    from mks2.data.sampler import DistributedSampler, UnitStream

    packed_state = _sampler().state_dict()
    padded = DistributedSampler(UnitStream(SampleStream([50], seed=3), packing=False, seq_len=S), rank=0, world_size=2)
    with pytest.raises(ValueError, match="unknown sampler state version 'stage1_packed/1'"):
        padded.load_state_dict(packed_state)
    with pytest.raises(DataError, match="not of a packed stage-1 run"):
        _sampler(padded.state_dict())
