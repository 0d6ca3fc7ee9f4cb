"""Deterministic, resumable sampling: a global sample stream (shuffle + weighted mixing), training
rows ("units": one sample, or several packed), and their distribution over data-parallel ranks.

The design makes the state global and tiny, so it survives a change of data-parallel size:

- ``SampleStream``: an infinite stream of ``(dataset, index)``. Dataset ``d`` is read as consecutive
  epochs, each a pseudo-random permutation keyed by ``(seed, d, epoch)`` (``FeistelPermutation``,
  O(1) memory); draw ``k`` picks the dataset from a keyed uniform and the cumulative weights. State:
  the number of draws and each dataset's position (``position // size`` is its epoch).
- ``UnitStream``: cuts the sample stream into rows. Without packing a row is one sample; with packing
  consecutive samples are added while they fit ``seq_len`` (lengths include the expanded image prefix),
  next-fit. A row's end is found by peeking, so the state between rows is just the stream state.
- ``DistributedSampler``: rows are dealt in rounds of ``world_size``: rank ``r`` gets row ``r`` of
  every round. All ranks compute the same rounds, so after each round every rank knows the same global
  state; the loader commits it once the trainer has taken the batch. Resuming from it -- with any
  data-parallel size -- continues with exactly the rows not yet consumed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from mks2.data.errors import DataError
from mks2.data.permutation import FeistelPermutation, seed_words, uniform01

Unit = tuple[tuple[int, int], ...]  # ((dataset, index), ...) -- the samples of one row
_CHUNK = 4096  # draws / permuted positions computed per vectorised batch
STATE_VERSION = 2  # 2: ``consumed_rows`` added; ``consumed_samples`` counts samples (version 1 counted rows there)


class SampleStream:
    """Infinite deterministic stream of ``(dataset, index)`` pairs; see the module docstring."""

    def __init__(
        self,
        sizes: Sequence[int],
        *,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        shuffle: bool = True,
    ):
        if not sizes:
            raise ValueError("no datasets to sample from")
        for d, n in enumerate(sizes):
            if n < 1:
                raise ValueError(f"dataset {d} is empty")
        weights = list(weights) if weights is not None else [1.0] * len(sizes)
        if len(weights) != len(sizes) or any(w <= 0 for w in weights):
            raise ValueError(f"need one positive weight per dataset, got {weights}")
        self.sizes = [int(n) for n in sizes]
        self.weights = [float(w) for w in weights]
        self.seed = int(seed)
        self.shuffle = shuffle
        total = sum(self.weights)
        self._cum = np.cumsum([w / total for w in self.weights])
        self._cum[-1] = 1.0
        self._choice_key = int(seed_words(self.seed, 0x5EED, count=1)[0])
        self.draws = 0
        self.positions = [0] * len(sizes)
        self._choice_cache: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
        self._index_cache: list[tuple[int, np.ndarray]] = [(-1, np.empty(0, np.int64)) for _ in sizes]

    # -- state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"draws": self.draws, "positions": list(self.positions), "sizes": list(self.sizes)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if list(state["sizes"]) != self.sizes:
            raise ValueError(
                f"sampler state was saved for datasets of sizes {state['sizes']} but the datasets now have "
                f"{self.sizes} samples; the data changed since the checkpoint"
            )
        self.draws = int(state["draws"])
        self.positions = [int(p) for p in state["positions"]]

    def epochs(self) -> list[int]:
        return [p // n for p, n in zip(self.positions, self.sizes)]

    # -- draws --------------------------------------------------------------------------------

    def _choices(self, k: int) -> np.ndarray:
        """Dataset chosen at draws [k, k + _CHUNK)."""
        start, cached = self._choice_cache
        if start == k:
            return cached
        u = uniform01(self._choice_key, np.arange(k, k + _CHUNK, dtype=np.int64))
        choices = np.minimum(np.searchsorted(self._cum, u, side="right"), len(self.sizes) - 1)
        self._choice_cache = (k, choices)
        return choices

    def _dataset_at(self, k: int) -> int:
        if len(self.sizes) == 1:
            return 0
        base = k - k % _CHUNK
        return int(self._choices(base)[k - base])

    def _index_at(self, d: int, g: int) -> int:
        """Sample index at position ``g`` of dataset ``d``'s stream of epochs."""
        n = self.sizes[d]
        if not self.shuffle:
            return g % n
        base = g - g % _CHUNK
        start, cached = self._index_cache[d]
        if start != base:
            pos = np.arange(base, base + _CHUNK, dtype=np.int64)
            epoch = pos // n
            cached = np.empty(_CHUNK, dtype=np.int64)
            for e in np.unique(epoch):  # a chunk may straddle an epoch boundary
                sel = epoch == e
                cached[sel] = FeistelPermutation(n, (self.seed, d, int(e)))(pos[sel] - int(e) * n)
            self._index_cache[d] = (base, cached)
        return int(cached[g - base])

    def peek(self) -> tuple[int, int]:
        d = self._dataset_at(self.draws)
        return d, self._index_at(d, self.positions[d])

    def next(self) -> tuple[int, int]:
        d, i = self.peek()
        self.draws += 1
        self.positions[d] += 1
        return d, i

    def skip(self, count: int) -> None:
        """Advance by ``count`` draws without producing them (vectorised)."""
        if len(self.sizes) == 1:
            self.draws += count
            self.positions[0] += count
            return
        k, end = self.draws, self.draws + count
        while k < end:
            base = k - k % _CHUNK
            chunk = self._choices(base)[k - base : min(end - base, _CHUNK)]
            for d, c in zip(*np.unique(chunk, return_counts=True)):
                self.positions[int(d)] += int(c)
            k += len(chunk)
        self.draws = end


class UnitStream:
    """Rows cut from a ``SampleStream``: one sample per row, or next-fit packs up to ``seq_len``.

    ``length(d, i)``: tokens the sample occupies in a row (image prefix expanded); needed for packing."""

    def __init__(
        self, stream: SampleStream, *, packing: bool, seq_len: int, length: Callable[[int, int], int] | None = None
    ):
        if packing and length is None:
            raise ValueError("packing needs the sample lengths")
        self.stream = stream
        self.packing = packing
        self.seq_len = seq_len
        self._length = length

    def next_unit(self) -> Unit:
        first = self.stream.next()
        if not self.packing:
            return (first,)
        unit = [first]
        used = self._length(*first)  # type: ignore[misc]
        while used < self.seq_len:
            nxt = self.stream.peek()
            n = self._length(*nxt)  # type: ignore[misc]
            if used + n > self.seq_len:
                break
            self.stream.next()
            unit.append(nxt)
            used += n
        return tuple(unit)

    def skip_units(self, count: int) -> None:
        if not self.packing:
            self.stream.skip(count)
            return
        for _ in range(count):
            self.next_unit()


class DistributedSampler:
    """Rows for one data-parallel rank, dealt in rounds of ``world_size`` (see the module docstring).

    Iterating yields this rank's units forever. ``commit(n)`` marks ``n`` of the yielded units as taken
    by the trainer (the loader calls it per batch); ``state_dict()`` is the state after the last
    committed round, identical on every rank. A new iterator restarts from the committed state, so
    rows prefetched but never delivered are produced again."""

    def __init__(self, units: UnitStream, *, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        self.units = units
        self.rank = rank
        self.world_size = world_size
        self._committed = units.stream.state_dict()
        self._consumed_rows = 0  # rows consumed by all ranks together (steps x global batch)
        self._pending: deque[dict[str, Any]] = deque()

    def __iter__(self) -> Iterator[Unit]:
        self.units.stream.load_state_dict(self._committed)
        self._pending.clear()
        while True:
            batch = [self.units.next_unit() for _ in range(self.world_size)]
            self._pending.append(self.units.stream.state_dict())
            yield batch[self.rank]

    def commit(self, count: int) -> None:
        """The trainer took ``count`` more of this rank's units (all ranks took as many)."""
        for _ in range(count):
            self._committed = self._pending.popleft()
        self._consumed_rows += count * self.world_size

    def state_dict(self) -> dict[str, Any]:
        """The committed state, identical on every rank. ``consumed_rows``: training rows taken by all ranks
        together (steps x global batch); ``consumed_samples``: the samples in them (a stage-1 caption/image
        pair, a stage-2 instruction), more than the rows when packing -- the sample stream's draws."""
        s = self.units.stream
        return {
            "version": STATE_VERSION,
            "consumed_rows": self._consumed_rows,
            "consumed_samples": int(self._committed["draws"]),
            "epoch": [p // n for p, n in zip(self._committed["positions"], s.sizes)],
            "stream": dict(self._committed),
            "seed": s.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") not in (1, STATE_VERSION):  # version 1: checkpoints written before 2
            raise ValueError(f"unknown sampler state version {state.get('version')!r}")
        if state.get("seed") != self.units.stream.seed:
            raise DataError(
                f"sampler state was saved with seed {state.get('seed')}, this run uses {self.units.stream.seed} "
                "(train.seed must stay the same on resume)"
            )
        self.units.stream.load_state_dict(state["stream"])  # validates dataset sizes
        self._committed = self.units.stream.state_dict()
        # version 1 named the row count ``consumed_samples``
        self._consumed_rows = int(state["consumed_rows"] if state["version"] > 1 else state["consumed_samples"])
        self._pending.clear()

    def skip_rows(self, consumed_rows: int) -> None:
        """Start after ``consumed_rows`` rows consumed globally (replays the row cuts when packing)."""
        self.units.stream.load_state_dict(self._committed)
        self.units.skip_units(consumed_rows)
        self._committed = self.units.stream.state_dict()
        self._consumed_rows += consumed_rows
        self._pending.clear()


class EvalSampler:
    """One ordered pass over every sample of the eval datasets, one sample per row, dealt round-robin.
    Padded by wrapping to a multiple of ``world_size * batch_size`` so every rank runs the same number
    of batches (the last ``padded`` rows repeat the first samples)."""

    def __init__(self, sizes: Sequence[int], *, rank: int, world_size: int, batch_size: int):
        self.units: list[Unit] = [((d, i),) for d, n in enumerate(sizes) for i in range(n)]
        per_round = world_size * batch_size
        total = -(-len(self.units) // per_round) * per_round
        self.padded = total - len(self.units)
        self.units += [self.units[j % len(self.units)] for j in range(self.padded)]
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Unit]:
        return iter(self.units[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(self.units) // self.world_size
