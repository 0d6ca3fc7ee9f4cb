"""Tensor sources: where the converter reads a model's tensors from, one tensor at a time.

A source maps our model's parameter names (``model.layers.0.mlp.up_proj.weight``, ...) to tensors:

- :class:`ModuleSource`: an in-memory ``MKS2ForCausalLM`` (or any module with our names);
- ``mks2.export.zero_source.ZeroSource``: a ZeRO checkpoint, read with DeepSpeed's ``zero_to_fp32``;
- ``mks2.export.pipeline_source.PipelineSource``: DeepSpeed pipeline layer files.

Checkpoint sources read through memory maps. Pages of a mapped file that were read count in the
process's resident set until the mapping goes away, so they re-open their files (dropping the maps)
whenever more than ``refresh_bytes`` were read since the last opening; this bounds the resident
memory to about that budget plus the tensors in flight, whatever the checkpoint's size.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_REFRESH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()


class TensorSource:
    """Interface: ``meta`` (name -> shape/dtype, in the preferred read order), ``get(name)`` (a tensor
    that owns its memory or views a memory map), ``close()``. Used as a context manager."""

    meta: dict[str, TensorMeta]
    description: str = ""

    def get(self, name: str) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ModuleSource(TensorSource):
    """The parameters and persistent buffers of an in-memory module (tied parameters listed once)."""

    def __init__(self, module: nn.Module, description: str = "in-memory model"):
        self._tensors: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in module.state_dict(keep_vars=True).items():
            if id(tensor) in seen:  # lm_head.weight tied to the embedding: the first name owns it
                continue
            seen.add(id(tensor))
            self._tensors[name] = tensor
        self.meta = {n: TensorMeta(tuple(t.shape), t.dtype) for n, t in self._tensors.items()}
        self.description = description

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


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
