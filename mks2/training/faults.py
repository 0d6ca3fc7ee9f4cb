"""Fault handling: non-finite losses, preemption signals, and the fault-injection hooks tests use.

Non-finite steps. A loss that is NaN/inf is multiplied by NaN before backward, so EVERY gradient it
reaches is NaN (a NaN term added to finite ones would otherwise leave some gradients finite). The
data-parallel gradient reduction spreads the NaN to every rank and DeepSpeed's global gradient-norm
check (all-reduced over data-parallel and pipeline ranks) then discards the step on all ranks
together; the loop reads that back with ``engine.was_step_applied()``. No extra collective needed.

Preemption. SIGTERM (what Slurm sends before it kills a job; SIGUSR1 too, for ``--signal=USR1@T``)
sets a flag; the loop finishes the current optimizer step, all ranks agree through the per-step
metrics all-reduce, save a checkpoint and exit with status 0.

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
