"""Tensor sources: where the converter and the consolidating readers get a model's tensors from,
one tensor at a time, and :class:`TensorSpec`, the one description of a tensor (shape + dtype).

A source maps parameter names (``model.layers.0.mlp.up_proj.weight``, ...) to tensors:

- :class:`ModuleSource`: an in-memory ``MKS2ForCausalLM`` (or any module with our names);
- ``mks2.checkpoint.zero_reader.ZeroSource``: a ZeRO checkpoint, read with DeepSpeed's ``zero_to_fp32``;
- ``mks2.checkpoint.pipeline_reader.PipelineSource``: DeepSpeed pipeline layer files;
- ``mks2.checkpoint.consolidated.ConsolidatedCheckpoint``: either of the two, under our names.

Checkpoint sources read through memory maps. Pages of a mapped file that were read count in the
process's resident set until the mapping goes away, so they re-open their files (dropping the maps)
whenever more than ``refresh_bytes`` were read since the last opening; this bounds the resident
memory to about that budget plus the tensors in flight, whatever the checkpoint's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

DEFAULT_REFRESH_BYTES = 256 * 2**20


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one tensor (its name is the key it is stored under)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @classmethod
    def of(cls, tensor: torch.Tensor) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype)

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()


def unique_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and persistent buffers by name, tied ones once (the first name owns
    them: ``model.embed_tokens.weight``, not a tied ``lm_head.weight``)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def tensor_specs(module: nn.Module) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of :func:`unique_tensors` (a meta-device module costs no memory)."""
    return {name: TensorSpec.of(t) for name, t in unique_tensors(module).items()}


class TensorSource:
    """Interface: ``meta`` (name -> TensorSpec, in the preferred read order), ``get(name)`` (a tensor
    that owns its memory or views a memory map), ``close()``. Used as a context manager."""

    meta: dict[str, TensorSpec]
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
        self._tensors = unique_tensors(module)
        self.meta = {n: TensorSpec.of(t) for n, t in self._tensors.items()}
        self.description = description

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name].detach()


class CombinedSource(TensorSource):
    """Several sources read as one (e.g. DeepSpeed's files and the zero3 towers file); ``meta`` in the
    sources' order. A name in two of them is an error: which copy is right could not be told."""

    def __init__(self, *sources: TensorSource):
        self.sources = sources
        self.description = " + ".join(s.description for s in sources)
        self.meta: dict[str, TensorSpec] = {}
        self._owner: dict[str, TensorSource] = {}
        for source in sources:
            for name, spec in source.meta.items():
                if name in self._owner:
                    raise ValueError(
                        f"tensor {name!r} is in both {self._owner[name].description} and {source.description}"
                    )
                self.meta[name] = spec
                self._owner[name] = source

    def get(self, name: str) -> torch.Tensor:
        return self._owner[name].get(name)

    def close(self) -> None:
        for source in self.sources:
            source.close()
