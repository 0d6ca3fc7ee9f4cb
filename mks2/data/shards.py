"""Arrow IPC *stream* shards: schema, writing, and memory-mapped reading.

Stream (not file) format because HF ``datasets.Dataset.from_file`` accepts only streams. Columns:
``input_ids`` list<int32>, ``loss_mask`` list<int8> (1 = the token is a prediction target) and, for
kinds with images, ``image`` string (null for a text-only record; the path is relative to the image
root). Both list columns of a row have the same length (and the same offsets).

Reading maps the file (``mmap``) and locates each column's Arrow buffers (offsets, values, validity)
in the mapping; no pyarrow object is touched per sample. A row is then read in one of two ways:

- ``view``: numpy views into the mapping (zero-copy). Fastest while the touched pages stay mapped,
  but every touched page joins the process's RSS, and on kernels that cache files in large folios one
  fault maps up to 2 MiB. Bounding RSS means dropping the pages (``release_pages``, MADV_DONTNEED)
  and faulting them in again, which costs ~3 faults per sample on a large dataset.
- ``read``: positioned reads (``os.preadv``) of the row's offsets and values at the buffers' file
  positions into fresh arrays: a few syscalls, nothing mapped, so RSS does not grow at all with the
  dataset, and on large datasets it is several times faster than re-faulting the mapping
  (``tools/bench_loader.py``). The loader uses this.
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
    lengths: np.ndarray, values: np.ndarray, mask: np.ndarray, images: list[str | None] | pa.StringArray | None
) -> pa.Buffer:
    """Arrow stream bytes of one shard, as a ``pa.Buffer`` (bytes-like: ``len``, hashing and file
    writes take it as is). ``lengths`` [R] tokens per row; ``values`` int32 [T] and ``mask`` int8 [T]
    the rows' tokens concatenated; ``images`` [R] (a list, or a string array as Arrow's JSON reader
    returns it: the same bytes) or None for text kinds. Deterministic: equal inputs give equal bytes."""
    assert values.dtype == np.int32 and mask.dtype == np.int8 and len(values) == len(mask)
    if len(values) > np.iinfo(np.int32).max:
        raise DatasetError(f"a shard would hold {len(values)} tokens (> 2^31): lower --records-per-shard")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    assert offsets[-1] == len(values)
    schema = shard_schema(images is not None)
    batches = []
    for lo in range(0, len(lengths), BATCH_ROWS):
        hi = min(lo + BATCH_ROWS, len(lengths))
        o = offsets[lo : hi + 1]
        base = o[0]
        rel = _numpy_array(o - base, pa.int32())
        cols = [
            pa.ListArray.from_arrays(rel, _numpy_array(values[base : o[-1]], pa.int32())),
            pa.ListArray.from_arrays(rel, _numpy_array(mask[base : o[-1]], pa.int8())),
        ]
        if isinstance(images, pa.Array):  # the IPC writer stores a slice's offsets from 0
            cols.append(images.slice(lo, hi - lo))
        elif images is not None:
            cols.append(_string_array(images[lo:hi]))
        batches.append(pa.record_batch(cols, schema=schema))
    # Written twice: once to count the bytes, then into a buffer of exactly that size. A growing
    # BufferOutputStream and a copy into bytes cost more (fresh pages for every shard).
    counter = pa.MockOutputStream()
    _write_stream(counter, schema, batches)
    out = pa.allocate_buffer(counter.size())
    _write_stream(pa.FixedSizeBufferWriter(out), schema, batches)
    return out


def _write_stream(sink: pa.NativeFile, schema: pa.Schema, batches: list[pa.RecordBatch]) -> None:
    with pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


def _numpy_array(arr: np.ndarray, typ: pa.DataType) -> pa.Array:
    """``pa.array(arr)`` of a 1-D numpy array of ``typ`` (zero-copy, no nulls) without ``pa.array``'s
    pandas probe, which imports pandas (1-2 s) in every pretokenize worker at its first shard."""
    return pa.Array.from_buffers(typ, len(arr), [None, pa.py_buffer(np.ascontiguousarray(arr))])


def _string_array(values: list[str | None]) -> pa.Array:
    """``pa.array(values, type=pa.string())`` without its cost: with an explicit type pyarrow 26
    converts ~80x slower (~4 us a string) than when it infers the type, which made the image column
    the largest per-record cost of a caption shard. A list of strings only (every caption shard) is
    built from its UTF-8 bytes and offsets directly, which also skips ``pa.array``'s pandas import;
    otherwise inference, then the explicit type for lists inference cannot type as string (all None,
    or empty). Same buffers every way (the golden test pins the bytes)."""
    if values and None not in values:
        try:
            encoded = [v.encode("utf-8") for v in values]
        except (AttributeError, UnicodeEncodeError):  # not a str, or a lone surrogate: pa.array decides
            encoded = None
        if encoded is not None:
            offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
            np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), out=offsets[1:])
            if offsets[-1] <= np.iinfo(np.int32).max:
                buffers = [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(b"".join(encoded))]
                return pa.Array.from_buffers(pa.string(), len(encoded), buffers)
    arr = pa.array(values)
    return arr if arr.type == pa.string() else pa.array(values, type=pa.string())


def sha256_bytes(data: bytes | pa.Buffer) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class _Batch:
    rows: int
    ids_offsets: np.ndarray  # int32 [n + 1] view into the mapping
    ids_values: np.ndarray  # int32 [T] view
    mask_values: np.ndarray  # int8 [T] view
    offsets_pos: int  # file position of ids_offsets[0]
    ids_pos: int  # file position of ids_values[0]
    mask_pos: int  # file position of mask_values[0]
    mask_offsets: np.ndarray  # int32 [n + 1] view (equal to ids_offsets; checked on request)
    image: pa.StringArray | None
    image_valid_pos: int | None  # file position of the validity bitmap (None: every row has an image)
    image_bit0: int  # bit offset of row 0 in that bitmap
    image_offsets_pos: int  # file position of the string offsets (int32 [n + 1])
    image_data_pos: int  # file position of the string bytes


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


def _pread(fd: int, pos: int, dtype: type, count: int) -> np.ndarray:
    out = np.empty(count, dtype=dtype)
    if count and os.preadv(fd, [out], pos) != out.nbytes:
        raise DatasetError(f"short read at byte {pos} (file truncated while open?)")
    return out


class MappedShard:
    """One shard mapped read-only; rows by ``row(j)`` (views) or ``read_row(j)`` (positioned reads)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            base = pa.py_buffer(self._mm)
            reader = pa.ipc.open_stream(pa.BufferReader(base))
            schema = reader.schema
            batches = list(reader)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise DatasetError(f"{self.path}: not a readable Arrow stream shard ({exc})") from exc
        want = {"input_ids": pa.list_(pa.int32()), "loss_mask": pa.list_(pa.int8())}
        for name, typ in want.items():
            if schema.get_field_index(name) < 0 or schema.field(name).type != typ:
                raise DatasetError(f"{self.path}: column {name} of type {typ} missing (schema: {schema})")
        self.has_image_column = schema.get_field_index("image") >= 0
        self._fd: int | None = None
        self._batches: list[_Batch] = []
        starts = [0]
        for b in batches:
            ids, mask = b.column("input_ids"), b.column("loss_mask")
            ids_off, ids_val = _list_views(ids, np.int32)
            mask_off, mask_val = _list_views(mask, np.int8)
            img = b.column("image") if self.has_image_column else None
            valid_pos, bit0, str_off_pos, str_data_pos = None, 0, 0, 0
            if img is not None:
                bufs = img.buffers()
                if img.null_count:
                    valid_pos, bit0 = bufs[0].address - base.address, img.offset
                str_off_pos = bufs[1].address - base.address + 4 * img.offset
                str_data_pos = bufs[2].address - base.address if bufs[2] is not None else 0
            self._batches.append(
                _Batch(
                    rows=b.num_rows,
                    ids_offsets=ids_off,
                    ids_values=ids_val,
                    mask_values=mask_val,
                    offsets_pos=ids_off.ctypes.data - base.address,
                    ids_pos=ids_val.ctypes.data - base.address,
                    mask_pos=mask_val.ctypes.data - base.address,
                    mask_offsets=mask_off,
                    image=img,
                    image_valid_pos=valid_pos,
                    image_bit0=bit0,
                    image_offsets_pos=str_off_pos,
                    image_data_pos=str_data_pos,
                )
            )
            starts.append(starts[-1] + b.num_rows)
        self._starts = starts
        self.num_rows = starts[-1]
        self.release_pages()  # opening touched the metadata's pages (a whole large folio each)

    # -- positioned reads ------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def _locate(self, j: int) -> tuple[_Batch, int]:
        if len(self._batches) == 1:
            return self._batches[0], j
        import bisect

        k = bisect.bisect_right(self._starts, j) - 1
        return self._batches[k], j - self._starts[k]

    def _bounds(self, b: _Batch, k: int) -> tuple[int, int]:
        lo, hi = _pread(self.fd, b.offsets_pos + 4 * k, np.int32, 2).tolist()
        return lo, hi

    def read_row(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int32 [L], loss_mask int8 [L]) of row ``j`` as fresh arrays (positioned reads)."""
        b, k = self._locate(j)
        lo, hi = self._bounds(b, k)
        return _pread(self.fd, b.ids_pos + 4 * lo, np.int32, hi - lo), _pread(
            self.fd, b.mask_pos + lo, np.int8, hi - lo
        )

    def read_length(self, j: int) -> int:
        b, k = self._locate(j)
        lo, hi = self._bounds(b, k)
        return hi - lo

    def read_has_image(self, j: int) -> bool:
        b, k = self._locate(j)
        if b.image is None:
            return False
        if b.image_valid_pos is None:
            return True
        bit = k + b.image_bit0
        byte = _pread(self.fd, b.image_valid_pos + (bit >> 3), np.uint8, 1)[0]
        return bool((byte >> (bit & 7)) & 1)

    def read_image(self, j: int) -> str | None:
        if not self.read_has_image(j):
            return None
        b, k = self._locate(j)
        lo, hi = _pread(self.fd, b.image_offsets_pos + 4 * k, np.int32, 2).tolist()
        return _pread(self.fd, b.image_data_pos + lo, np.uint8, hi - lo).tobytes().decode("utf-8")

    # -- views into the mapping -------------------------------------------------------------------

    def row(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int32 [L], loss_mask int8 [L]) of row ``j``: views into the mapping. Both columns
        share the ids' offsets (the writer makes them equal; ``check_offsets`` verifies)."""
        b, k = self._locate(j)
        lo, hi = b.ids_offsets[k], b.ids_offsets[k + 1]
        return b.ids_values[lo:hi], b.mask_values[lo:hi]

    def length(self, j: int) -> int:
        b, k = self._locate(j)
        return int(b.ids_offsets[k + 1] - b.ids_offsets[k])

    def has_image(self, j: int) -> bool:
        return self.read_has_image(j)

    def image(self, j: int) -> str | None:
        b, k = self._locate(j)
        return None if b.image is None else b.image[k].as_py()

    # -- whole-shard checks -----------------------------------------------------------------------

    def check_offsets(self) -> None:
        """Both list columns must have identical offsets (reads every offset: done with hash checks)."""
        for b in self._batches:
            if not np.array_equal(b.ids_offsets, b.mask_offsets) or len(b.ids_values) != len(b.mask_values):
                raise DatasetError(f"{self.path}: input_ids and loss_mask rows differ in length")

    def iter_values(self):
        """The whole input_ids values buffer of each batch (for vocabulary checks)."""
        for b in self._batches:
            yield b.ids_values

    def release_pages(self) -> None:
        """Drop this process's resident pages of the mapping (the page cache keeps them)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED)
