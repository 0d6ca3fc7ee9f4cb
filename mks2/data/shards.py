"""Arrow IPC *stream* shards: schema, writing, and zero-copy memory-mapped reading.

Stream (not file) format because HF ``datasets.Dataset.from_file`` accepts only streams. Columns:
``input_ids`` list<int32>, ``loss_mask`` list<int8> (1 = the token is a prediction target) and, for
kinds with images, ``image`` string (null for a text-only record; the path is relative to the image
root). Both list columns of a row have the same length.

Reading maps the file (``mmap``) and takes numpy views of each list column's offsets and values
buffers: a random access costs two slices and touches only the pages of that row, and never copies a
shard into RAM. Touched pages of a file mapping count in the process's RSS although they are shared
page cache; ``MappedShard.release_pages`` drops them (``MADV_DONTNEED``) so a long random walk over a
large dataset keeps a bounded RSS (the dataset calls it every few tens of MiB read).
"""

from __future__ import annotations

import hashlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from mks2.data.errors import DatasetError

FORMAT_NAME = "mks2-pretokenized"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_TEMPLATE = "shard-{:06d}.arrow"
# Rows per record batch inside a shard; readers handle any batching.
BATCH_ROWS = 65536


def shard_name(index: int) -> str:
    return SHARD_TEMPLATE.format(index)


def shard_schema(with_image: bool) -> pa.Schema:
    fields = [pa.field("input_ids", pa.list_(pa.int32())), pa.field("loss_mask", pa.list_(pa.int8()))]
    if with_image:
        fields.append(pa.field("image", pa.string()))
    return pa.schema(fields, metadata={"mks2.format_version": str(FORMAT_VERSION)})


def serialize_shard(
    lengths: np.ndarray, values: np.ndarray, mask: np.ndarray, images: list[str | None] | None
) -> bytes:
    """Arrow stream bytes of one shard. ``lengths`` [R] tokens per row; ``values`` int32 [T] and
    ``mask`` int8 [T] the rows' tokens concatenated; ``images`` [R] or None for text kinds.
    Deterministic: equal inputs give equal bytes."""
    assert values.dtype == np.int32 and mask.dtype == np.int8 and len(values) == len(mask)
    if len(values) > np.iinfo(np.int32).max:
        raise DatasetError(f"a shard would hold {len(values)} tokens (> 2^31): lower --records-per-shard")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    assert offsets[-1] == len(values)
    schema = shard_schema(images is not None)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        for lo in range(0, len(lengths), BATCH_ROWS):
            hi = min(lo + BATCH_ROWS, len(lengths))
            o = offsets[lo : hi + 1]
            base = o[0]
            cols = [
                pa.ListArray.from_arrays(pa.array(o - base), pa.array(values[base : o[-1]])),
                pa.ListArray.from_arrays(pa.array(o - base), pa.array(mask[base : o[-1]])),
            ]
            if images is not None:
                cols.append(pa.array(images[lo:hi], type=pa.string()))
            writer.write_batch(pa.record_batch(cols, schema=schema))
    return sink.getvalue().to_pybytes()


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so a crash never leaves a
    partial file under the final name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Batch:
    ids_offsets: np.ndarray  # int32 [n + 1] view into the mapping
    ids_values: np.ndarray  # int32 [T]
    mask_offsets: np.ndarray  # int32 [n + 1]
    mask_values: np.ndarray  # int8 [T]
    image: pa.StringArray | None
    image_valid: np.ndarray | None  # uint8 validity bitmap view (None: every row has an image)
    image_offset: int  # bit offset of row 0 in the bitmap


def _list_views(arr: pa.ListArray, dtype: type) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int32 [n + 1], values [T]) of a list column as numpy views of its Arrow buffers.
    ``Array.to_numpy(zero_copy_only=True)`` is avoided: for buffers that are not 64-byte aligned (IPC
    aligns to 8) pyarrow copies them, which would read a whole shard into RAM."""
    if arr.null_count:
        raise DatasetError("list columns of a shard must not hold nulls")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    child = arr.values
    itemsize = np.dtype(dtype).itemsize
    values = np.frombuffer(child.buffers()[1], dtype=dtype, count=len(child), offset=child.offset * itemsize)
    return offsets, values


class MappedShard:
    """One shard mapped read-only. ``row(j)`` returns zero-copy numpy views."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            reader = pa.ipc.open_stream(pa.BufferReader(pa.py_buffer(self._mm)))
            schema = reader.schema
            batches = list(reader)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DatasetError(f"{self.path}: not a readable Arrow stream shard ({exc})") from exc
        want = {"input_ids": pa.list_(pa.int32()), "loss_mask": pa.list_(pa.int8())}
        for name, typ in want.items():
            if schema.get_field_index(name) < 0 or schema.field(name).type != typ:
                raise DatasetError(f"{self.path}: column {name} of type {typ} missing (schema: {schema})")
        self.has_image_column = schema.get_field_index("image") >= 0
        self._batches: list[_Batch] = []
        starts = [0]
        for b in batches:
            ids, mask = b.column("input_ids"), b.column("loss_mask")
            img = b.column("image") if self.has_image_column else None
            valid, valid_off = None, 0
            if img is not None and img.null_count:
                bitmap = img.buffers()[0]
                valid = np.frombuffer(bitmap, dtype=np.uint8)
                valid_off = img.offset
            self._batches.append(
                _Batch(*_list_views(ids, np.int32), *_list_views(mask, np.int8), img, valid, valid_off)
            )
            starts.append(starts[-1] + b.num_rows)
        self._starts = starts
        self.num_rows = starts[-1]

    def _locate(self, j: int) -> tuple[_Batch, int]:
        if len(self._batches) == 1:
            return self._batches[0], j
        import bisect

        k = bisect.bisect_right(self._starts, j) - 1
        return self._batches[k], j - self._starts[k]

    def row(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int32 [L], loss_mask int8 [L]) of row ``j``: views into the mapping. Both columns
        share the ids' offsets (the writer makes them equal; ``check_offsets`` verifies), which saves
        touching a third region of the file per access."""
        b, k = self._locate(j)
        lo, hi = b.ids_offsets[k], b.ids_offsets[k + 1]
        return b.ids_values[lo:hi], b.mask_values[lo:hi]

    def check_offsets(self) -> None:
        """Both list columns must have identical offsets (reads every offset: done with hash checks)."""
        for b in self._batches:
            if not np.array_equal(b.ids_offsets, b.mask_offsets) or len(b.ids_values) != len(b.mask_values):
                raise DatasetError(f"{self.path}: input_ids and loss_mask rows differ in length")

    def length(self, j: int) -> int:
        b, k = self._locate(j)
        return int(b.ids_offsets[k + 1] - b.ids_offsets[k])

    def has_image(self, j: int) -> bool:
        b, k = self._locate(j)
        if b.image is None:
            return False
        if b.image_valid is None:
            return True
        bit = k + b.image_offset
        return bool((b.image_valid[bit >> 3] >> (bit & 7)) & 1)

    def image(self, j: int) -> str | None:
        b, k = self._locate(j)
        return None if b.image is None else b.image[k].as_py()

    def iter_values(self):
        """The whole input_ids values buffer of each batch (for vocabulary checks)."""
        for b in self._batches:
            yield b.ids_values

    def release_pages(self) -> None:
        """Drop this process's resident pages of the mapping (the page cache keeps them)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)
