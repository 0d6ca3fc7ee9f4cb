"""Loading ``.pt`` files without running code from them: ``weights_only=True`` plus an explicit allow-list.

A ``.pt`` file is a pickle; ``torch.load(..., weights_only=False)`` (what DeepSpeed 0.19.8 uses for its
own checkpoint files and in ``zero_to_fp32``) calls whatever the pickle names, ``os.system`` included.
Every ``.pt`` the trainer reads or hands to DeepSpeed goes through this module instead:

- ``check_checkpoint_files(dir)``: scans every ``.pt`` under a checkpoint directory BEFORE anything
  reads it (``torch.serialization.get_unsafe_globals_in_checkpoint`` walks the pickle's opcodes, it
  does not execute them) and refuses the first file naming a global outside the allow-list;
- ``safe_load(path)``: ``torch.load(weights_only=True)`` with the allow-list, the refusal naming file
  and type;
- ``SafeTorchCheckpointEngine`` / ``install_safe_checkpoint_engine(engine)``: DeepSpeed's checkpoint
  engine with ``load`` replaced by ``safe_load``, put into a built engine (model, optimizer and
  pipeline layer files all go through ``engine.checkpoint_engine.load``); its ``save`` records a
  failed write (a full disk) in ``write_failures`` instead of raising in the middle of DeepSpeed's
  collectives, so the trainer can stop every rank cleanly;
- ``safe_torch_load()``: a context in which every ``torch.load`` call is ``safe_load`` (for DeepSpeed's
  readers that call ``torch.load`` themselves: ``zero_to_fp32``, the universal-checkpoint loaders).

The allow-list is what DeepSpeed's checkpoints of both parallel modes need (measured, DESIGN.md §5):
``LossScaler``, ``ZeroStageEnum`` and ``fragment_address``. Our own per-rank files need none of them.
"""

from __future__ import annotations

import contextlib
import functools
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mks2.checkpoint.errors import CheckpointError

ALLOWED_GLOBAL_NAMES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""Fully qualified names of the only non-torch globals a checkpoint file may reference."""


class UnsafeCheckpointError(CheckpointError):
    """A ``.pt`` file references a global outside the allow-list (names the file and the type); it
    was not loaded, so nothing in it ran."""


def allowed_globals() -> list[Any]:
    """The allow-listed classes themselves (what ``torch.serialization.safe_globals`` takes)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def unsafe_globals(path: str | Path) -> list[str]:
    """Globals ``path``'s pickle names that neither torch's weights-only unpickler nor the allow-list
    accepts (an empty list for a safe file). Reads the opcodes only; nothing is executed."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:  # not a zip checkpoint, truncated, ...: safe_load reports it
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    return [n for n in names if n not in ALLOWED_GLOBAL_NAMES]


def _refusal(path: str | Path, names: list[str]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused to load, it references {', '.join(names)} (allowed beyond tensors and containers: "
        f"{', '.join(n.rsplit('.', 1)[1] for n in ALLOWED_GLOBAL_NAMES)}); nothing from the file was run. "
        "Delete the file or the checkpoint if you did not write it"
    )


def check_checkpoint_files(directory: str | Path) -> int:
    """Refuse (UnsafeCheckpointError) the first ``.pt`` under ``directory`` that needs a global outside
    the allow-list. Returns how many files were checked."""
    files = sorted(Path(directory).rglob("*.pt"))
    for file in files:
        bad = unsafe_globals(file)
        if bad:
            raise _refusal(file, bad)
    return len(files)


_real_torch_load = torch.load


def safe_load(path: Any, map_location: Any = None, **kwargs: Any) -> Any:
    """``torch.load(path, weights_only=True)`` with the allow-list; ``weights_only`` passed by the
    caller is ignored (DeepSpeed passes False)."""
    kwargs.pop("weights_only", None)
    kwargs.pop("pickle_module", None)
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return _real_torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as exc:
        names = unsafe_globals(path) if isinstance(path, (str, Path)) else []
        raise _refusal(path, names or [str(exc).splitlines()[0]]) from None


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Inside the block every ``torch.load`` is :func:`safe_load` (for library readers we cannot pass
    ``weights_only`` to). Process-wide while active; the real ``torch.load`` comes back afterwards."""
    previous = torch.load
    torch.load = safe_load
    try:
        yield
    finally:
        torch.load = previous


@functools.cache
def _safe_engine_class() -> type:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine; ``load`` is :func:`safe_load` (save is unchanged)."""

        write_failures: list[str]

        def load(self, path: str, map_location: Any = None) -> Any:
            return safe_load(path, map_location=map_location)

        def save(self, state_dict: Any, path: str) -> None:
            # A failed write (full disk: torch raises RuntimeError "enforce fail at inline_container")
            # is recorded, not raised: DeepSpeed's save has collectives after this call, and a rank that
            # left early would leave the others waiting. The trainer checks the list after the save.
            try:
                super().save(state_dict, path)
            except (OSError, RuntimeError) as exc:
                Path(path).unlink(missing_ok=True)
                self.write_failures.append(write_failure(path, exc))

    return SafeTorchCheckpointEngine


def install_safe_checkpoint_engine(engine: Any) -> None:
    """Make a built DeepSpeed engine load every checkpoint file through :func:`safe_load`."""
    current = getattr(engine, "checkpoint_engine", None)
    if current is None:
        raise RuntimeError("the DeepSpeed engine has no checkpoint_engine to replace")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(current) is not TorchCheckpointEngine:
        raise CheckpointError(
            f"DeepSpeed checkpoint engine {type(current).__name__} is not supported (its loads are not "
            "weights-only); remove the checkpoint-engine settings from the DeepSpeed template"
        )
    safe = _safe_engine_class()
    current.__class__ = safe  # same object (its settings stay), loads are weights-only from now on
    current.write_failures = []
    copy_scripts = getattr(engine, "_copy_recovery_script", None)
    if copy_scripts is not None:  # rank 0 copies zero_to_fp32.py into every ZeRO checkpoint

        def guarded_copy(save_path: str) -> None:
            try:
                copy_scripts(save_path)
            except OSError as exc:
                current.write_failures.append(write_failure(exc.filename or save_path, exc))

        engine._copy_recovery_script = guarded_copy


def write_failure(path: Any, exc: BaseException) -> str:
    """``<file>: <reason>`` for a failed checkpoint write (torch's full-disk RuntimeError included)."""
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
    if "enforce fail" in reason or "file write failed" in reason:
        reason = f"write failed ({reason[:120]})"
    return f"{path}: {reason}"
