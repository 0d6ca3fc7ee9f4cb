"""Sampling: permutations, epochs, DP disjointness, exact resume, DP-size change, mixing, packing."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from mks2.data.permutation import FeistelPermutation
from mks2.data.sampler import DistributedSampler, EvalSampler, SampleStream, UnitStream


def _sampler(sizes=(50,), *, rank=0, world=1, seed=3, weights=None, packing=False, seq_len=16, lengths=None):
    stream = SampleStream(list(sizes), weights=weights, seed=seed)
    length = (lambda d, i: lengths[d][i]) if lengths is not None else None
    return DistributedSampler(
        UnitStream(stream, packing=packing, seq_len=seq_len, length=length), rank=rank, world_size=world
    )


def _take(sampler, batches, batch_size):
    """What a loader does: take ``batches`` batches of units from a fresh iterator, committing each."""
    it = iter(sampler)
    out = []
    for _ in range(batches):
        out.append([next(it) for _ in range(batch_size)])
        sampler.commit(batch_size)
    return out


def _global_rows(samplers, batches, batch_size):
    """Rows of all ranks in global order (round r: rank 0, 1, ...)."""
    per_rank = [list(itertools.chain.from_iterable(_take(s, batches, batch_size))) for s in samplers]
    return [u for rnd in zip(*per_rank) for u in rnd]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_permutation_is_a_bijection(n):
    p = FeistelPermutation(n, (1, 2))(np.arange(n))
    assert sorted(p.tolist()) == list(range(n))
    if n >= 64:
        assert p.tolist() != list(range(n))
        assert p.tolist() != FeistelPermutation(n, (1, 3))(np.arange(n)).tolist()


def test_every_sample_once_per_epoch_new_order_each_epoch():
    s = SampleStream([300], seed=11)
    epoch0 = [s.next()[1] for _ in range(300)]
    epoch1 = [s.next()[1] for _ in range(300)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(300))
    assert epoch0 != epoch1 and s.epochs() == [2]
    s2 = SampleStream([300], seed=11)
    assert [s2.next()[1] for _ in range(300)] == epoch0  # deterministic by seed
    s3 = SampleStream([300], seed=12)
    assert [s3.next()[1] for _ in range(300)] != epoch0


def test_ranks_are_disjoint_and_cover_the_epoch():
    world, B, n = 3, 4, 48
    samplers = [_sampler((n,), rank=r, world=world) for r in range(world)]
    rows = _global_rows(samplers, batches=n // (world * B), batch_size=B)
    idx = [u[0][1] for u in rows]
    assert sorted(idx) == list(range(n))  # every sample exactly once, no rank overlap
    single = _global_rows([_sampler((n,))], batches=n // B, batch_size=B)
    assert rows == single  # DP only changes who gets a row, not the row order


def test_resume_mid_epoch_yields_exactly_the_rest():
    world, B = 2, 3
    full = [_sampler((40,), rank=r, world=world) for r in range(world)]
    uninterrupted = [list(itertools.chain.from_iterable(_take(s, 5, B))) for s in full]

    first = [_sampler((40,), rank=r, world=world) for r in range(world)]
    for s in first:
        _take(s, 2, B)
    states = [s.state_dict() for s in first]
    assert states[0] == states[1] and states[0]["consumed_samples"] == 2 * B * world
    resumed = [_sampler((40,), rank=r, world=world) for r in range(world)]
    for s, st in zip(resumed, states):
        s.load_state_dict(st)
    rest = [list(itertools.chain.from_iterable(_take(s, 3, B))) for s in resumed]
    assert [u[2 * B :] for u in uninterrupted] == rest


def test_uncommitted_prefetch_is_produced_again():
    s = _sampler((40,))
    it = iter(s)
    taken = [next(it) for _ in range(4)]
    s.commit(2)
    [next(it) for _ in range(5)]  # prefetched, never handed to the trainer
    again = next(iter(s))  # a new iterator restarts at the committed state
    assert again == taken[2]


def test_data_parallel_size_change_on_resume():
    n, B = 60, 2
    before = [_sampler((n,), rank=r, world=2) for r in range(2)]
    rows_before = _global_rows(before, batches=3, batch_size=B)  # 12 rows
    state = before[0].state_dict()
    after = [_sampler((n,), rank=r, world=3) for r in range(3)]
    for s in after:
        s.load_state_dict(state)
    rows_after = _global_rows(after, batches=8, batch_size=B)  # 48 rows
    idx = [u[0][1] for u in rows_before + rows_after]
    assert sorted(idx) == list(range(n))  # the epoch completes with every sample exactly once
    reference = _global_rows([_sampler((n,))], batches=30, batch_size=B)
    assert rows_before + rows_after == reference
    assert after[0].state_dict()["consumed_samples"] == 12 + 48


def test_skip_rows_matches_iterating():
    s = _sampler((37,), world=2, rank=1)
    s.skip_rows(10)
    ref = _sampler((37,), world=1)
    _take(ref, 10, 1)
    assert s.state_dict()["stream"] == ref.state_dict()["stream"]


def test_weighted_mixing_is_deterministic_and_resumable():
    sizes, weights = [200, 50], [3.0, 1.0]
    s = SampleStream(sizes, weights=weights, seed=5)
    draws = [s.next() for _ in range(4000)]
    share = Counter(d for d, _ in draws)[0] / len(draws)
    assert abs(share - 0.75) < 0.03
    # each dataset is still read epoch by epoch: within a dataset's first epoch, every index once
    first_epoch_b = [i for d, i in draws if d == 1][:50]
    assert sorted(first_epoch_b) == list(range(50))
    again = SampleStream(sizes, weights=weights, seed=5)
    assert [again.next() for _ in range(4000)] == draws
    skipped = SampleStream(sizes, weights=weights, seed=5)
    skipped.skip(2500)
    assert skipped.state_dict() == {**SampleStream(sizes, weights=weights, seed=5).state_dict(), **_state_after(2500)}
    assert [skipped.next() for _ in range(100)] == draws[2500:2600]

    state = _state_after(1234)
    resumed = SampleStream(sizes, weights=weights, seed=5)
    resumed.load_state_dict(state)
    assert [resumed.next() for _ in range(10)] == draws[1234:1244]
    with pytest.raises(ValueError, match="the data changed since the checkpoint"):
        SampleStream([201, 50], weights=weights, seed=5).load_state_dict(state)


def _state_after(k):
    s = SampleStream([200, 50], weights=[3.0, 1.0], seed=5)
    for _ in range(k):
        s.next()
    return s.state_dict()


def test_packing_fills_rows_in_stream_order():
    rng = np.random.default_rng(0)
    lengths = [rng.integers(1, 12, size=80).tolist()]
    lengths[0][5] = 40  # longer than seq_len: a row of its own (truncated by the collator)
    s = _sampler((80,), packing=True, seq_len=16, lengths=lengths)
    units = list(itertools.chain.from_iterable(_take(s, 30, 1)))
    flat = [x for u in units for x in u]
    order = SampleStream([80], seed=3)
    assert flat == [order.next() for _ in range(len(flat))]  # packing never reorders or drops samples
    for u in units:
        total = sum(lengths[0][i] for _, i in u)
        assert total <= 16 or len(u) == 1
    assert any(len(u) > 1 for u in units)
    # next-fit: a row ends only when the next sample does not fit
    for u, nxt in zip(units, units[1:]):
        assert sum(lengths[0][i] for _, i in u) + lengths[0][nxt[0][1]] > 16


def test_packed_resume_and_dp_change():
    rng = np.random.default_rng(1)
    lengths = [rng.integers(1, 10, size=100).tolist()]
    ref = _global_rows([_sampler((100,), packing=True, lengths=lengths)], batches=22, batch_size=2)
    a = [_sampler((100,), rank=r, world=2, packing=True, lengths=lengths) for r in range(2)]
    head = _global_rows(a, batches=3, batch_size=2)
    b = [_sampler((100,), rank=r, world=4, packing=True, lengths=lengths) for r in range(4)]
    for s in b:
        s.load_state_dict(a[1].state_dict())
    tail = _global_rows(b, batches=4, batch_size=2)
    assert head + tail == ref[:44]
    replay = _sampler((100,), packing=True, lengths=lengths)
    replay.skip_rows(12)  # resume from a row count alone replays the row cuts
    assert replay.state_dict()["stream"] == a[0].state_dict()["stream"]


def test_state_checks():
    s = _sampler((40,))
    st = s.state_dict()
    with pytest.raises(ValueError, match="seed"):
        _sampler((40,), seed=4).load_state_dict(st)
    with pytest.raises(ValueError, match="sizes"):
        _sampler((41,)).load_state_dict(st)


def test_eval_sampler_pads_to_equal_batches():
    world, B = 3, 2
    parts = [list(EvalSampler([5, 3], rank=r, world_size=world, batch_size=B)) for r in range(world)]
    assert {len(p) for p in parts} == {4}  # 8 samples -> 12 slots: two batches of 2 on every rank
    seen = Counter(u for p in parts for u in p)
    assert set(seen) == {((d, i),) for d, n in enumerate([5, 3]) for i in range(n)}
    assert sum(seen.values()) - 8 == EvalSampler([5, 3], rank=0, world_size=world, batch_size=B).padded == 4


def test_consumed_counts_rows_and_the_samples_they_hold():
    """With packing a row holds several samples: the state counts both (rows = steps x global batch)."""
    lengths = [[5 + (i % 4) for i in range(60)]]  # 5-8 tokens: two or three samples per 16-token row
    s = _sampler((60,), world=2, packing=True, seq_len=16, lengths=lengths)
    rows = list(itertools.chain.from_iterable(_take(s, 3, 2)))  # this rank's 6 of the 12 global rows
    state = s.state_dict()
    assert state["consumed_rows"] == 12
    assert state["consumed_samples"] == state["stream"]["draws"] > 12
    assert sum(len(u) for u in rows) < state["consumed_samples"]  # the other rank's rows count too
    unpacked = _sampler((60,), world=2)
    _take(unpacked, 3, 2)
    assert unpacked.state_dict()["consumed_rows"] == unpacked.state_dict()["consumed_samples"] == 12


def test_version_1_state_resumes_with_its_row_count():
    """Checkpoints written before version 2 called the row count ``consumed_samples``."""
    lengths = [[5 + (i % 4) for i in range(60)]]
    first = _sampler((60,), packing=True, seq_len=16, lengths=lengths)
    _take(first, 2, 3)
    state = first.state_dict()
    old = {k: v for k, v in state.items() if k != "consumed_rows"} | {"version": 1, "consumed_samples": 6}
    resumed = _sampler((60,), packing=True, seq_len=16, lengths=lengths)
    resumed.load_state_dict(old)
    assert resumed.state_dict() == state
