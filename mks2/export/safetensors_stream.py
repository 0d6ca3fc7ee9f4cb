"""Streaming writer of sharded safetensors checkpoints: one tensor in memory at a time.

The safetensors format is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the raw little-endian tensor bytes. Every tensor's shape and dtype
is known before the first byte is written (from the checkpoint's metadata), so each shard's header
is written up front and tensors are appended as they are produced; nothing accumulates in memory.
The index (``model.safetensors.index.json``) has transformers' layout; a model that fits in one
shard gets a single ``model.safetensors`` and no index, as ``save_pretrained`` does.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from mks2.checkpoint.tensors import TensorSpec

DTYPE_CODES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """``5GB`` / ``500MiB`` / ``1000000`` -> bytes (decimal units as transformers, binary with ``i``)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"--max-shard-size: cannot parse {text!r} (examples: 5GB, 500MB, 2GiB)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "").lower()]
    if value < 1:
        raise ValueError(f"--max-shard-size: must be positive, got {text!r}")
    return int(value)


NamedSpec = tuple[str, TensorSpec]
"""One tensor to write: its name in the file and its shape/dtype."""


def plan_shards(specs: Sequence[NamedSpec], max_shard_bytes: int) -> list[list[NamedSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[NamedSpec]] = []
    size = 0
    for name, spec in specs:
        if not shards or (size + spec.nbytes > max_shard_bytes and shards[-1]):
            shards.append([])
            size = 0
        shards[-1].append((name, spec))
        size += spec.nbytes
    return shards


def _header(specs: Sequence[NamedSpec], metadata: dict[str, str]) -> bytes:
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, spec in specs:
        entries[name] = {
            "dtype": DTYPE_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # 8-byte alignment of the data section (as the reference writer does)
    return struct.pack("<Q", len(raw)) + raw


class ShardedSafetensorsWriter:
    """Write ``specs`` ((name, TensorSpec) pairs, in this order) into ``directory`` as safetensors shards + index.

    Call :meth:`write` once per tensor in plan order, then :meth:`close`. A wrong name, shape or dtype
    raises before anything of that tensor is written.
    """

    def __init__(self, directory: Path, specs: Sequence[NamedSpec], *, max_shard_bytes: int, prefix: str = "model"):
        dtypes = {s.dtype for _, s in specs} - set(DTYPE_CODES)
        if dtypes:
            raise ValueError(f"cannot write tensors of dtype {sorted(map(str, dtypes))} to safetensors")
        names = [n for n, _ in specs]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the export plan")
        self.directory = Path(directory)
        self.prefix = prefix
        self.shards = plan_shards(list(specs), max_shard_bytes)
        n = len(self.shards)
        self.files = (
            [f"{prefix}.safetensors"] if n == 1 else [f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._order = [(i, name, spec) for i, shard in enumerate(self.shards) for name, spec in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self._file_index = -1
        self.total_bytes = sum(s.nbytes for _, s in specs)

    @property
    def expected(self) -> NamedSpec | None:
        """The next tensor to write (None when all are written)."""
        return self._order[self._next][1:] if self._next < len(self._order) else None

    def _open(self, index: int) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.directory / self.files[index], "wb")
        self._file.write(_header(self.shards[index], {"format": "pt"}))
        self._file_index = index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name}: every planned tensor was already written")
        index, planned, spec = self._order[self._next]
        if name != planned or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise ValueError(
                f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} does not match the plan's next tensor "
                f"{planned} {spec.shape} {spec.dtype}"
            )
        if index != self._file_index:
            self._open(index)
        data = tensor.detach().to("cpu").contiguous()
        if data.numel():
            # A uint8 view of the same memory: the bytes go to the file without another copy.
            self._file.write(memoryview(data.view(torch.uint8).reshape(-1).numpy()))
        self._next += 1

    def close(self) -> list[str]:
        """Finish the last shard and write the index (sharded case). Returns the files written."""
        if self._next != len(self._order):
            missing = [name for _, name, _ in self._order[self._next :]]
            raise ValueError(f"{len(missing)} planned tensor(s) were never written (first: {missing[0]})")
        if self._file is None and self.shards:  # an all-empty plan still gets its (empty) file
            self._open(0)
        if self._file is not None:
            self._file.close()
            self._file = None
        written = list(self.files)
        if len(self.files) > 1:
            weight_map = {name: self.files[i] for i, name, _ in self._order}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            name = f"{self.prefix}.safetensors.index.json"
            (self.directory / name).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
            written.append(name)
        return written

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
