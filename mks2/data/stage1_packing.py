"""Stage-1 packed micro-batches: (caption view, retrieval view) pairs in a fixed token budget.

Layout of one micro-batch: ``R = data.tokens_per_micro_batch // data.seq_len`` rows of ``S = data.seq_len``
tokens, the same [R, S] every micro-batch (the pipeline engine sends fixed activation shapes between
stages; CUDA graphs and the allocator see one shape). Every view is a segment of its own inside one
row (segment ids restart at 1 in each row, positions restart at 0 in each segment), so the model's
same-segment causal mask (CPU) or flash-attn varlen (GPU) keeps views apart -- the stage-2 packing
machinery, unchanged:

    caption view   = BOS, P image-prefix placeholders, caption tokens, EOS   (labels on caption + EOS)
    retrieval view = BOS, caption tokens, EOS                                 (EOS state -> retrieval)

A caption view never spans two rows; one longer than a row is truncated with its EOS kept
(``data.long_captions=truncate``, the truncated EOS is trained and counted) or refused
(``refuse``: a DataError naming the file and row, raised identically on every rank).

Steps (``plan_step``): a step holds ``train.global_batch_size`` captions (``G``). Every rank draws the
same G samples from the global stream and computes the same plan: each pair goes, in stream order, to
the least-filled of the ``dp x GAS`` micro-batches ("bins", bin ``m * dp + r`` = micro-batch ``m`` of
rank ``r``) in which both of its views fit (first-fit rows inside a bin). The micro-batch count per
step stays DeepSpeed's fixed ``gradient_accumulation_steps`` (both modes), so a rank whose bins are
short of pairs computes padding, never a different number of micro-batches. A pair that fits no bin
(the step's captions exceed ``dp x GAS x budget`` tokens) is carried into the next step, first in line,
and that step draws one sample fewer: no caption is lost, steps stay deterministic, and a step holds
fewer than G captions only when the budget is too small for its captions (rare at 10% headroom).

Because the plan is global, every micro-batch knows the step's global caption-token and pair counts
without a collective (``StepHeader``): the losses are sums scaled by ``micro_batches / count``, whose
mean over the step's micro-batches and ranks (DeepSpeed's gradient averaging) is the mean over the
global batch's caption tokens (pairs), independent of how the captions were packed.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mks2.constants import IGNORE_INDEX
from mks2.data.errors import DataError
from mks2.data.sampler import SampleStream

STATE_VERSION = "stage1_packed/1"  # a string: the padded sampler (versions 1, 2) refuses it by name


class CaptionTooLongError(DataError):
    """A caption does not fit one row and ``data.long_captions=refuse``."""


@dataclass(frozen=True)
class ViewLengths:
    caption: int  # BOS + P + caption tokens + EOS (after truncation)
    retrieval: int  # BOS + caption tokens + EOS
    labels: int  # caption tokens + EOS: the caption loss's targets
    truncated: bool


def max_caption_view(seq_len: int, rows: int, num_prefix_tokens: int) -> int:
    """Longest caption view a micro-batch of ``rows`` x ``seq_len`` can hold with its retrieval view:
    a row, or with a single row both views in it (caption + caption - P <= S)."""
    return seq_len if rows >= 2 else (seq_len + num_prefix_tokens) // 2


def min_pair_tokens(num_prefix_tokens: int) -> int:
    """The smallest pair with one caption token: caption view P + 3, retrieval view 3."""
    return num_prefix_tokens + 6


def view_lengths(raw_len: int, *, num_prefix_tokens: int, max_caption: int) -> ViewLengths:
    """Lengths of a caption sample's two views. ``raw_len``: the pretokenized sample, ``<s> <image>
    caption </s>`` (the placeholder counted once)."""
    P = num_prefix_tokens
    cap = raw_len - 1 + P
    truncated = cap > max_caption
    cap = min(cap, max_caption)
    return ViewLengths(caption=cap, retrieval=cap - P, labels=cap - 1 - P, truncated=truncated)


@dataclass(frozen=True)
class PairSlot:
    """Where one (caption, image) pair sits in its micro-batch."""

    dataset: int
    index: int
    cap_row: int
    cap_start: int
    cap_len: int
    ret_row: int
    ret_start: int
    ret_len: int


@dataclass(frozen=True)
class StepHeader:
    """Step-wide counts every micro-batch carries (identical on every rank): the normalisers of the losses."""

    caption_tokens: int  # caption-loss targets of the whole step, all ranks
    pairs: int  # pairs of the whole step, all ranks
    micro_batches: int  # dp x GAS


class _Bin:
    __slots__ = ("free", "slots", "used")

    def __init__(self, rows: int, seq_len: int):
        self.free = [seq_len] * rows  # tokens left per row (rows fill from the left)
        self.slots: list[PairSlot] = []
        self.used = 0

    def place(self, d: int, i: int, v: ViewLengths, seq_len: int) -> bool:
        free = list(self.free)
        spots = []
        for n in (v.caption, v.retrieval):  # first-fit, caption first (the longer view)
            row = next((r for r, f in enumerate(free) if f >= n), None)
            if row is None:
                return False
            spots.append((row, seq_len - free[row]))
            free[row] -= n
        self.free = free
        (cr, cs), (rr, rs) = spots
        self.slots.append(PairSlot(d, i, cr, cs, v.caption, rr, rs, v.retrieval))
        self.used += v.caption + v.retrieval
        return True


def plan_step(
    samples: Sequence[tuple[int, int]],
    views: Sequence[ViewLengths],
    *,
    bins: int,
    rows: int,
    seq_len: int,
) -> tuple[list[list[PairSlot]], list[int]]:
    """Place a step's pairs (in order) into ``bins`` micro-batches of [rows, seq_len]; returns (the slots
    of each bin, positions in ``samples`` of the pairs that fit nowhere: carried to the next step)."""
    packed = [_Bin(rows, seq_len) for _ in range(bins)]
    heap = [(0, b) for b in range(bins)]  # (tokens used, bin): least filled first, ties by bin index
    carried = []
    for k, ((d, i), v) in enumerate(zip(samples, views)):
        tried = []
        placed = False
        while heap:
            used, b = heapq.heappop(heap)
            tried.append(b)
            if packed[b].place(d, i, v, seq_len):
                placed = True
                break
        for b in tried:
            heapq.heappush(heap, (packed[b].used, b))
        if not placed:
            carried.append(k)
    return [p.slots for p in packed], carried


class PackedStepSampler:
    """DataLoader ``batch_sampler`` of one rank's packed stage-1 micro-batches (see module docstring).

    Yields, per micro-batch, ``[StepHeader, PairSlot, ...]``. ``commit(1)`` per micro-batch handed to the
    trainer; ``state_dict()`` is the state after the last COMPLETE step committed (checkpoints are taken
    at step boundaries), identical on every rank."""

    def __init__(
        self,
        stream: SampleStream,
        *,
        rank: int,
        world_size: int,
        grad_accumulation_steps: int,
        captions_per_step: int,
        rows: int,
        seq_len: int,
        num_prefix_tokens: int,
        length: Callable[[int, int], int],
        where: Callable[[int, int], str],
        refuse_long: bool = False,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world size {world_size}")
        self.stream = stream
        self.rank, self.world_size, self.gas = rank, world_size, grad_accumulation_steps
        self.captions_per_step = captions_per_step
        self.rows, self.seq_len, self.P = rows, seq_len, num_prefix_tokens
        self.max_caption = max_caption_view(seq_len, rows, num_prefix_tokens)
        self._length, self._where, self.refuse_long = length, where, refuse_long
        self._committed = self._state(stream.state_dict(), [], 0, 0, 0)
        self._pending: list[dict[str, Any]] = []
        self._taken = 0  # micro-batches of the current step committed

    @staticmethod
    def _state(stream: dict, carry: list, rows: int, steps: int, truncated: int) -> dict[str, Any]:
        return {"stream": stream, "carry": [list(c) for c in carry], "consumed_rows": rows, "steps": steps,
                "truncated": truncated}  # fmt: skip

    def _views(self, d: int, i: int) -> ViewLengths:
        v = view_lengths(self._length(d, i), num_prefix_tokens=self.P, max_caption=self.max_caption)
        if v.truncated and self.refuse_long:
            raise CaptionTooLongError(
                f"{self._where(d, i)}: caption of {self._length(d, i) - 1 + self.P} tokens (image prefix included) "
                f"does not fit a row of data.seq_len={self.seq_len} (at most {self.max_caption}); raise data.seq_len "
                "or set data.long_captions=truncate"
            )
        return v

    def __iter__(self) -> Iterator[list[Any]]:
        state = self._committed
        self.stream.load_state_dict(state["stream"])
        carry = [tuple(c) for c in state["carry"]]
        rows, steps, truncated = state["consumed_rows"], state["steps"], state["truncated"]
        self._pending.clear()
        self._taken = 0
        while True:
            samples = carry + [self.stream.next() for _ in range(self.captions_per_step - len(carry))]
            views = [self._views(d, i) for d, i in samples]
            bins, left = plan_step(samples, views, bins=self.world_size * self.gas, rows=self.rows,
                                   seq_len=self.seq_len)  # fmt: skip
            dropped = set(left)
            kept = [v for k, v in enumerate(views) if k not in dropped]
            carry = [samples[k] for k in left]
            header = StepHeader(caption_tokens=sum(v.labels for v in kept), pairs=len(kept),
                                micro_batches=self.world_size * self.gas)  # fmt: skip
            rows, steps, truncated = rows + len(kept), steps + 1, truncated + sum(v.truncated for v in kept)
            self._pending.append(self._state(self.stream.state_dict(), carry, rows, steps, truncated))
            for m in range(self.gas):
                yield [header, *bins[m * self.world_size + self.rank]]

    def commit(self, count: int = 1) -> None:
        for _ in range(count):
            self._taken += 1
            if self._taken == self.gas:
                self._committed = self._pending.pop(0)
                self._taken = 0

    def state_dict(self) -> dict[str, Any]:
        c = self._committed
        return {
            "version": STATE_VERSION,
            "kind": "stage1_packed",
            "consumed_rows": c["consumed_rows"],  # captions trained, all ranks
            "consumed_samples": int(c["stream"]["draws"]) - len(c["carry"]),
            "steps": c["steps"],
            "truncated": c["truncated"],
            "epoch": [p // n for p, n in zip(c["stream"]["positions"], self.stream.sizes)],
            "stream": dict(c["stream"]),
            "carry": [list(x) for x in c["carry"]],
            "seed": self.stream.seed,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "stage1_packed" or state.get("version") != STATE_VERSION:
            raise DataError("the checkpoint's data state is not of a packed stage-1 run (data.packing changed?)")
        if state.get("seed") != self.stream.seed:
            raise DataError(
                f"sampler state was saved with seed {state.get('seed')}, this run uses {self.stream.seed} "
                "(train.seed must stay the same on resume)"
            )
        self.stream.load_state_dict(state["stream"])
        self._committed = self._state(self.stream.state_dict(), state["carry"], int(state["consumed_rows"]),
                                      int(state["steps"]), int(state["truncated"]))  # fmt: skip
        self._pending.clear()
        self._taken = 0


class PackedPairCollator:
    """``[StepHeader, sample, ...]`` (each sample a RowDataset sample plus its ``slot``) -> one packed
    micro-batch:

    - ``input_ids`` / ``labels`` / ``position_ids`` / ``segment_ids`` [R, S] (segment 0 = padding);
    - ``pixel_values`` [K, 3, H, W]: the K images in the row-major order of their caption views (the
      order ``embed_inputs`` splices prefixes in); absent when K = 0;
    - ``ret_eos_flat`` [K]: flat index (row * S + column) of pair k's retrieval-view EOS;
    - ``step_caption_tokens``, ``step_pairs``, ``step_micro_batches``: 0-d int64, the StepHeader.
    """

    def __init__(self, *, seq_len: int, rows: int, num_prefix_tokens: int, image_token_id: int, pad_id: int,
                 eos_id: int):  # fmt: skip
        self.S, self.R, self.P = seq_len, rows, num_prefix_tokens
        self.image_token_id, self.pad_id, self.eos_id = image_token_id, pad_id, eos_id

    def _caption_tokens(self, sample: dict[str, Any], slot: PairSlot) -> np.ndarray:
        ids, mask = np.asarray(sample["input_ids"]), np.asarray(sample["loss_mask"])
        # The loss mask is the caption's and EOS's, or all zero (an undecodable image: the sample keeps its
        # place with a placeholder image and no caption loss, see mks2.data.loader.RowDataset).
        ok = len(ids) >= 3 and ids[1] == self.image_token_id and not mask[:2].any()
        ok = ok and (mask[2:].all() or not mask.any()) and sample.get("pixel_values") is not None
        if not ok:
            raise DataError(
                f"sample {slot.index} of dataset {slot.dataset} is not a caption record <s> <image> caption </s> "
                "with loss on the caption and EOS"
            )
        return ids[2:-1].astype(np.int64)[: slot.cap_len - self.P - 2]  # truncation keeps the EOS below

    @staticmethod
    def _trained(sample: dict[str, Any]) -> bool:
        return bool(np.asarray(sample["loss_mask"]).any())

    def __call__(self, items: Sequence[Any]) -> dict[str, torch.Tensor]:
        header, samples = items[0], items[1:]
        R, S, P = self.R, self.S, self.P
        ids = np.full((R, S), self.pad_id, dtype=np.int64)
        labels = np.full((R, S), IGNORE_INDEX, dtype=np.int64)
        pos = np.zeros((R, S), dtype=np.int64)
        seg = np.zeros((R, S), dtype=np.int64)
        starts: list[list[tuple[int, int]]] = [[] for _ in range(R)]  # (start, length) per row
        order = sorted(range(len(samples)), key=lambda k: (samples[k]["slot"].cap_row, samples[k]["slot"].cap_start))
        eos, images = [], []
        bos = None
        for k in order:
            sample = samples[k]
            slot: PairSlot = sample["slot"]
            text = self._caption_tokens(sample, slot)
            bos = int(np.asarray(sample["input_ids"])[0])
            cap = np.concatenate([[bos], np.full(P, self.image_token_id), text, [self.eos_id]])
            cap_labels = np.concatenate([np.full(1 + P, IGNORE_INDEX), text, [self.eos_id]])
            if not self._trained(sample):
                cap_labels[:] = IGNORE_INDEX
            ret = np.concatenate([[bos], text, [self.eos_id]])
            assert len(cap) == slot.cap_len and len(ret) == slot.ret_len, (len(cap), slot)
            r, c = slot.cap_row, slot.cap_start
            ids[r, c : c + len(cap)], labels[r, c : c + len(cap)] = cap, cap_labels
            pos[r, c : c + len(cap)] = np.arange(len(cap))
            starts[r].append((c, len(cap)))
            r, c = slot.ret_row, slot.ret_start
            ids[r, c : c + len(ret)] = ret
            pos[r, c : c + len(ret)] = np.arange(len(ret))
            starts[r].append((c, len(ret)))
            eos.append(r * S + c + len(ret) - 1)
            images.append(sample["pixel_values"])
        for r, spans in enumerate(starts):  # segments numbered 1, 2, ... left to right in each row
            for n, (c, length) in enumerate(sorted(spans), start=1):
                seg[r, c : c + length] = n
        batch = {
            "input_ids": torch.from_numpy(ids),
            "labels": torch.from_numpy(labels),
            "position_ids": torch.from_numpy(pos),
            "segment_ids": torch.from_numpy(seg),
            "ret_eos_flat": torch.tensor(eos, dtype=torch.int64),
            "step_caption_tokens": torch.tensor(header.caption_tokens, dtype=torch.int64),
            "step_pairs": torch.tensor(header.pairs, dtype=torch.int64),
            "step_micro_batches": torch.tensor(header.micro_batches, dtype=torch.int64),
        }
        if images:
            batch["pixel_values"] = torch.stack(images)
        return batch


class PairDataset(torch.utils.data.Dataset):
    """Keys of :class:`PackedStepSampler` -> what :class:`PackedPairCollator` takes: the StepHeader as
    it is, a PairSlot as its sample (image loaded, in the DataLoader workers) with the slot attached."""

    def __init__(self, rows: Any):
        self.rows = rows  # mks2.data.loader.RowDataset

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, StepHeader):
            return key
        sample = dict(self.rows[((key.dataset, key.index),)][0])
        sample["slot"] = key
        return sample
