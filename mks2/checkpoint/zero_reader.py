"""Read a ZeRO checkpoint tensor by tensor with DeepSpeed's own reader (``deepspeed.utils.zero_to_fp32``).

- Trainable parameters: ``get_fp32_state_dict_from_zero_checkpoint(..., lazy_mode=True)`` returns
  DeepSpeed's lazy ``GatheredTensor`` objects over the fp32 master partitions of every rank (the
  optimizer files, memory-mapped); ``.contiguous()`` assembles one full tensor.
- Frozen parameters (stage 1: attention, MLP, embeddings, head, vision towers) are not in the
  optimizer: every rank's model-state file holds its fragment of each. DeepSpeed's reader merges all
  of them at once; here its merge function (``_zero3_merge_frozen_params``, or the ZeRO-1/2 variant)
  is called for one parameter at a time, so the partition arithmetic stays DeepSpeed's and only one
  frozen tensor is ever assembled. Frozen tensors keep the dtype they were trained in (bf16 in a bf16
  run); trainable ones come out in fp32 (the master weights).

The model-state files are memory-mapped as well (``torch.load`` does not map them by default).
DeepSpeed's reader unpickles with ``weights_only=False``; here it runs inside ``safe_torch_load`` (every
``torch.load`` weights-only with the allow-list of ``mks2.checkpoint.safe_load``), so a file needing
anything else is refused and nothing from it runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from mks2.checkpoint.safe_load import safe_load, safe_torch_load
from mks2.checkpoint.tensors import DEFAULT_REFRESH_BYTES, TensorSource, TensorSpec

_ZERO3_FILE = re.compile(r"zero_pp_rank_\d+_mp_rank_\d+_model_states\.pt$")


@contextlib.contextmanager
def mmap_torch_load() -> Iterator[None]:
    """Make ``torch.load`` calls that do not say otherwise memory-map their file (DeepSpeed's reader
    loads its model-state files without ``mmap``; mapped, a multi-GB file costs no RAM up front)."""
    from torch.utils.serialization import config

    previous = config.load.mmap
    config.load.mmap = True
    try:
        yield
    finally:
        config.load.mmap = previous


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Capture the prints and progress bars of library code we call repeatedly (DeepSpeed's reader)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        yield buffer


class ZeroSource(TensorSource):
    """Tensors of a ZeRO checkpoint directory (``<save_dir>/<tag>``), by DeepSpeed's parameter names."""

    def __init__(self, ckpt_dir: str | Path, *, refresh_bytes: int = DEFAULT_REFRESH_BYTES):
        self.dir = Path(ckpt_dir)
        self.refresh_bytes = refresh_bytes
        self.description = f"ZeRO checkpoint {self.dir}"
        self._lazy: dict[str, Any] | None = None
        self._states: list[Any] | None = None
        self._touched = 0
        self.reopened = 0  # how many times the memory maps were dropped and re-created
        self._open()
        lazy, states = self._lazy, self._states
        assert lazy is not None and states is not None
        frozen = dict(states[0].frozen_param_shapes or {})
        self._frozen_names = set(frozen)
        self.zero3 = bool(_ZERO3_FILE.search(self._model_files[0]))
        meta: dict[str, TensorSpec] = {}
        for name, shape in frozen.items():
            meta[name] = TensorSpec(tuple(shape), states[0].frozen_param_fragments[name].dtype)
        for name, value in lazy.items():
            if name not in meta:
                meta[name] = TensorSpec(tuple(value.shape), value.dtype)
        # Read in the module's own order (model-state files list every name there).
        order = [n for n in self._module_order if n in meta] + [n for n in meta if n not in self._module_order]
        self.meta = {n: meta[n] for n in order}

    def _open(self) -> None:
        from deepspeed.utils import zero_to_fp32 as z

        with mmap_torch_load(), safe_torch_load(), quiet():
            self._model_files = z.get_model_state_files(str(self.dir))
            self._states = z.parse_model_states(self._model_files)
            self._lazy = z.get_fp32_state_dict_from_zero_checkpoint(
                str(self.dir.parent), tag=self.dir.name, exclude_frozen_parameters=True, lazy_mode=True
            )
            if not hasattr(self, "_module_order"):  # every name, in the module's order (first opening only)
                module = safe_load(self._model_files[0], map_location="cpu").get("module") or {}
                self._module_order = list(module)
                del module

    def _release(self) -> None:
        self._lazy = None
        self._states = None
        self._touched = 0
        self.reopened += 1

    def get(self, name: str) -> torch.Tensor:
        if name not in self.meta:
            raise KeyError(f"{self.dir}: no tensor {name!r} in this checkpoint")
        if self._lazy is None:
            self._open()
        if name in self._frozen_names:
            tensor = self._frozen(name)
        else:
            value = self._lazy[name]
            tensor = value.contiguous() if not isinstance(value, torch.Tensor) else value
        self._touched += self.meta[name].nbytes
        if self._touched >= self.refresh_bytes:
            self._release()  # dropped maps release their resident pages; re-opened on the next get
        return tensor

    def _frozen(self, name: str) -> torch.Tensor:
        from deepspeed.utils import zero_to_fp32 as z

        subset = [
            dataclasses.replace(
                s,
                frozen_param_shapes={name: s.frozen_param_shapes[name]},
                frozen_param_fragments={name: s.frozen_param_fragments[name]},
            )
            for s in self._states
        ]
        out: dict[str, torch.Tensor] = {}
        with quiet():
            if self.zero3:
                z._zero3_merge_frozen_params(out, len(subset), subset)
            else:
                z._zero2_merge_frozen_params(out, subset)
        return out[name]

    def close(self) -> None:
        self._lazy = None
        self._states = None
