"""Fault handling: non-finite losses, preemption signals, and the fault-injection hooks tests use.

Non-finite steps. A loss that is NaN/inf is multiplied by NaN before backward, so EVERY gradient it
reaches is NaN (a NaN term added to finite ones would otherwise leave some gradients finite). The
data-parallel gradient reduction spreads the NaN to every rank and DeepSpeed's global gradient-norm
check (all-reduced over data-parallel and pipeline ranks) then discards the step on all ranks
together; the loop reads that back with ``engine.was_step_applied()``. No extra collective needed.

Preemption. SIGTERM (what Slurm sends before it kills a job; SIGUSR1 too, for ``--signal=USR1@T``)
sets a flag; the loop finishes the current optimizer step, all ranks agree through the per-step
metrics all-reduce, save a checkpoint and exit with status 0.

Undecodable images. A loader worker that cannot decode an image gives a tagged placeholder and no loss
for its sample (``mks2.data.images``), so no rank raises mid-step. After every optimizer step all ranks
sum the count (:func:`count_skipped_images`, one 8-byte all-reduce; the file names are gathered only on
a step that had any) and stop together, at that step boundary, past ``data.max_images_skipped``
(:class:`ImagesSkippedError`): no rank is left waiting in a collective.

Test hooks (environment variables; never set them in production):

- ``MKS2_INJECT_NAN=STEP:RANK[,STEP:RANK...]``: the loss of optimizer step STEP (1-based) on global
  rank RANK becomes NaN (every micro-batch of that step).
- ``MKS2_FAULT_KILL_AFTER_STEP=N``: rank 0 sends itself SIGKILL right after step N is logged (and
  saved, if due), simulating a crash; the launcher then takes the other ranks down.
"""

from __future__ import annotations

import os
import signal
from types import FrameType

import torch

from mks2.errors import UserError
from mks2.training import distributed

_current_step = 0  # 1-based number of the optimizer step being computed
_rank = 0


def set_context(*, step: int, rank: int) -> None:
    """Tell the hooks which optimizer step is being computed (1-based) and on which rank."""
    global _current_step, _rank
    _current_step, _rank = step, rank


def _nan_targets() -> set[tuple[int, int]]:
    spec = os.environ.get("MKS2_INJECT_NAN", "").strip()
    out = set()
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            step, rank = item.split(":")
            out.add((int(step), int(rank)))
        except ValueError as exc:
            raise ValueError(f"MKS2_INJECT_NAN: expected STEP:RANK[,STEP:RANK...], got {spec!r}") from exc
    return out


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """loss unchanged if finite, else NaN with a NaN gradient to everything upstream (no host sync)."""
    nan = torch.full_like(loss, float("nan"))
    return loss * torch.where(torch.isfinite(loss), torch.ones_like(loss), nan)


def maybe_poison(loss: torch.Tensor) -> torch.Tensor:
    """Apply the ``MKS2_INJECT_NAN`` hook, then :func:`poison_nonfinite`."""
    if (_current_step, _rank) in _nan_targets():
        loss = loss * float("nan")
    return poison_nonfinite(loss)


def maybe_kill_after(step: int, rank: int) -> None:
    """``MKS2_FAULT_KILL_AFTER_STEP`` hook."""
    target = os.environ.get("MKS2_FAULT_KILL_AFTER_STEP")
    if target and rank == 0 and step == int(target):
        os.kill(os.getpid(), signal.SIGKILL)


class PreemptionFlag:
    """Records SIGTERM/SIGUSR1; ``requested`` is checked once per step by the loop."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def install(self) -> PreemptionFlag:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)  # type: ignore[arg-type]
        self._previous.clear()


class TrainingAborted(UserError, RuntimeError):
    """The run stopped on purpose (too many consecutive non-finite steps); the message says why."""


class ImagesSkippedError(TrainingAborted):
    """More undecodable images than ``data.max_images_skipped``: every rank stops at the same step."""


def count_skipped_images(notes: list[str], *, counts: bool, device: torch.device) -> tuple[int, list[str]]:
    """Collective, every rank once per optimizer step: (images skipped in this step on all ranks, their
    notes "<file> (<reason>)" in rank order). ``notes``: this rank's, from the batches of the step;
    ``counts``: this rank reads the step's batches for its replica (every rank in ZeRO-3 mode, the first
    pipeline stage; the last stage decodes the same images and must not count them twice)."""
    mine = notes if counts else []
    n = distributed.all_reduce(torch.tensor([float(len(mine))], dtype=torch.float64, device=device))
    total = int(n.item())
    if total == 0:  # the usual step: no object collective
        return 0, []
    return total, [note for part in distributed.all_gather_object(mine) for note in part]


def check_images_skipped(*, total: int, cap: int, step: int, notes: list[str], last_saved: str | None,
                         save_dir: object) -> None:  # fmt: skip
    """Raise :class:`ImagesSkippedError` (same message on every rank) once ``total`` exceeds ``cap``
    (-1: no limit)."""
    if cap < 0 or total <= cap:
        return
    shown = "; ".join(notes[:5]) + (f"; and {len(notes) - 5} more" if len(notes) > 5 else "")
    last = last_saved or "none (no checkpoint was saved yet)"
    raise ImagesSkippedError(
        f"stopping at step {step}: {total} undecodable images skipped so far, more than "
        f"data.max_images_skipped={cap}; this step's: {shown}. Fix or remove these files (re-run pretokenize, "
        f"which checks images), or raise data.max_images_skipped; the last checkpoint is {last} in {save_dir}"
    )
