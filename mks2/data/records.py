"""Input files for ``pretokenize``: glob expansion and record iteration over JSONL (plain or gzip),
Parquet and CSV/TSV.

A ``.json`` file is JSONL unless its first character is ``[``: then it is one JSON array of records
(LLaVA ships its instruction data that way), loaded whole.

Records come out as ``(file_index, number, payload)`` in input order. ``number`` is the 1-based line
of a JSONL/CSV record (the line where a multi-line CSV record starts), the 1-based row of a Parquet
file or the 1-based item of a JSON array. JSONL payloads stay raw bytes so that UTF-8 decoding and
JSON parsing happen in the worker processes (in parallel, and with the record's location at hand
when they fail). A CSV row that cannot be used (wrong field count, a csv syntax error) arrives as a
``RecordProblem`` payload, so it is handled by ``--on-error`` like every other bad record.
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mks2.data.errors import PretokenizeError

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "json",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
}


class RecordProblem(Exception):
    """A record is unusable; ``str(exc)`` is the reason. Turned into ``BadRecord`` with its location."""


@dataclass(frozen=True)
class InputFile:
    path: str
    fmt: str  # jsonl | json (JSONL, or one JSON array) | parquet | csv | tsv
    gzipped: bool
    array: bool = False  # a .json file holding one JSON array

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)


def detect_format(path: str) -> tuple[str, bool]:
    """(format, gzipped) from the file name; raises PretokenizeError for unknown suffixes."""
    name = path.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    for suffix, fmt in _SUFFIXES.items():
        if name.endswith(suffix):
            if fmt == "parquet" and gz:
                break
            return fmt, gz
    allowed = ", ".join(sorted(set(_SUFFIXES) | {".jsonl.gz", ".csv.gz"}))
    raise PretokenizeError(f"{path}: cannot tell the input format from the name (known suffixes: {allowed})")


def resolve_inputs(patterns: Sequence[str]) -> list[InputFile]:
    """Expand files and globs, keeping the given order (matches of one glob sorted by name)."""
    if not patterns:
        raise PretokenizeError("no inputs given")
    files: list[InputFile] = []
    seen: set[str] = set()
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not matches:
                raise PretokenizeError(f"input pattern matches no file: {pattern}")
        elif os.path.isfile(expanded):
            matches = [expanded]
        else:
            raise PretokenizeError(f"input file not found: {pattern}")
        for path in matches:
            real = os.path.abspath(path)
            if real in seen:  # a file named twice (e.g. by two globs) is read once
                continue
            seen.add(real)
            fmt, gz = detect_format(path)
            f = InputFile(real, fmt, gz)
            if fmt == "json" and _first_byte(f) == b"[":
                f = InputFile(real, fmt, gz, array=True)
            files.append(f)
    return files


def _first_byte(f: InputFile) -> bytes:
    opener = gzip.open if f.gzipped else open
    with opener(f.path, "rb") as fh:
        while block := fh.read(4096):
            if stripped := block.lstrip():
                return stripped[:1]
    return b""


def _iter_json_array(f: InputFile) -> Iterator[tuple[int, Any]]:
    """A ``.json`` file holding one JSON array of records (LLaVA's instruction files). Loaded whole;
    locations name the 1-based item."""
    opener = gzip.open if f.gzipped else open
    try:
        with opener(f.path, "rb") as fh:
            items = json.loads(fh.read().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PretokenizeError(f"{f.path}: invalid UTF-8 at byte {exc.start}") from exc
    except json.JSONDecodeError as exc:
        raise PretokenizeError(f"{f.path}:{exc.lineno}: malformed JSON array ({exc.msg})") from exc
    yield from enumerate(items, 1)


def _iter_jsonl(f: InputFile) -> Iterator[tuple[int, Any]]:
    if f.array:
        yield from _iter_json_array(f)
        return
    opener = gzip.open if f.gzipped else open
    lineno = 0
    try:
        with opener(f.path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():  # blank lines (e.g. a trailing newline) are not records
                    yield lineno, line
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise PretokenizeError(f"{f.path}:{lineno + 1}: cannot read the file ({exc})") from exc


def _iter_csv(f: InputFile) -> Iterator[tuple[int, Any]]:
    delimiter = "\t" if f.fmt == "tsv" else ","
    csv.field_size_limit(sys.maxsize)  # long documents are judged by --max-tokens, not by csv's 128 kB limit
    # surrogateescape keeps invalid UTF-8 bytes as lone surrogates, which the worker reports per record.
    if f.gzipped:
        fh: Any = io.TextIOWrapper(gzip.open(f.path, "rb"), encoding="utf-8", errors="surrogateescape", newline="")
    else:
        fh = open(f.path, encoding="utf-8", errors="surrogateescape", newline="")
    with fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise PretokenizeError(f"{f.path}:1: cannot parse the CSV header ({exc})") from exc
        if len(set(header)) != len(header):
            raise PretokenizeError(f"{f.path}:1: duplicate column names in the CSV header: {header}")
        last_line = reader.line_num
        while True:
            start = last_line + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                last_line = reader.line_num
                yield start, RecordProblem(f"malformed CSV ({exc})")
                continue
            last_line = reader.line_num
            if not row:  # blank line
                continue
            if len(row) != len(header):
                yield start, RecordProblem(f"malformed CSV row: {len(row)} fields, the header has {len(header)}")
                continue
            yield start, dict(zip(header, row))


def _iter_parquet(f: InputFile) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(f.path)
    except Exception as exc:  # pyarrow raises ArrowInvalid/OSError for broken files
        raise PretokenizeError(f"{f.path}: not a readable Parquet file ({exc})") from exc
    row = 0
    for batch in pf.iter_batches(batch_size=8192):
        for rec in batch.to_pylist():
            row += 1
            yield row, rec


@dataclass(frozen=True)
class LineBlock:
    """Consecutive lines of one JSONL file, shipped to a worker as one bytes object instead of one
    object per record. ``data`` holds the lines exactly as read (newlines included, blank lines kept so
    that line numbers can be recounted), the first of them being 1-based line ``first_line``;
    ``records`` of them are not blank. A block of a plain (not gzipped) file may travel as its byte
    range instead (``offset`` >= 0, ``size`` bytes, ``data`` empty): the worker reads it
    (``load``), so the parent neither copies nor pickles the lines."""

    file_index: int
    first_line: int
    data: bytes
    records: int
    offset: int = -1
    size: int = 0

    def load(self, files: Sequence[InputFile]) -> LineBlock:
        """This block with its ``data`` (read from its file for a byte-range block)."""
        if self.offset < 0:
            return self
        path = files[self.file_index].path
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.pread(fd, self.size, self.offset)
            finally:
                os.close(fd)
        except OSError as exc:
            raise PretokenizeError(f"{path}:{self.first_line}: cannot read the file ({exc})") from exc
        if len(data) != self.size:
            raise PretokenizeError(f"{path}:{self.first_line}: the file became shorter while being read")
        return LineBlock(self.file_index, self.first_line, data, self.records)

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, line) of the block's records (non-blank lines), newline kept, as
        ``_iter_jsonl`` yields them."""
        parts = self.data.split(b"\n")
        last = len(parts) - 1
        for i, part in enumerate(parts):
            line = part if i == last else part + b"\n"
            if line and not line.isspace():  # bytes.isspace: the set bytes.strip() removes
                yield self.first_line + i, line


def is_line_file(f: InputFile) -> bool:
    """JSONL read as raw lines (``LineBlock``s); other inputs come record by record."""
    return f.fmt in ("jsonl", "json") and not f.array


# First bytes of the lines that may be blank: ``bytes.isspace``'s set (``bytes.strip()`` removes the
# same) and the newline itself (an empty line).
_BLANK_LEAD = np.array([0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20], dtype=np.uint8)


class LineReader:
    """Reads ``LineBlock``s of a JSONL file, ``take(n)`` records at a time. The file is read in chunks
    of about ``n`` lines, completed to a line end; each chunk's newlines are located once, with one
    numpy comparison (no object per line), and a block is cut at the newline that ends its ``n``-th
    record, so the parent's share of the work stays far below the tokenizer's even for short captions.
    Blank lines are found among the few lines that start with a whitespace byte. Work and copies are
    linear in the file size for any ``n`` (a chunk is sized to the request, and its newline positions
    are kept between requests)."""

    MIN_CHUNK, MAX_CHUNK = 1 << 16, 1 << 24

    def __init__(self, f: InputFile, file_index: int, *, ranges: bool = False):
        self.f, self.file_index = f, file_index
        self.ranges = ranges and not f.gzipped  # hand out byte ranges (``LineBlock.load``), not data
        self.fh = (gzip.open if f.gzipped else open)(f.path, "rb")
        self.lineno = 0  # lines handed out so far
        self.buf = b""  # the current chunk: whole lines (the last may lack its newline at EOF)
        self._pos = 0  # first byte of ``buf`` not handed out yet
        self._newlines = np.zeros(0, dtype=np.int64)  # positions of the newlines of ``buf``
        self._k = 0  # index in ``_newlines`` of the first newline at or after ``_pos``
        self._bytes, self._lines = 0, 0  # read so far: sizes the next chunk
        self._buf_offset = 0

    def _fill(self, lines_wanted: int) -> bool:
        per_line = self._bytes // self._lines if self._lines else 128
        size = min(max(lines_wanted * per_line, self.MIN_CHUNK), self.MAX_CHUNK)
        try:
            data = self.fh.read(size)
            if data and not data.endswith(b"\n"):
                data += self.fh.readline()
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            # the line number is the first one not handed out (a chunk fails as a whole)
            raise PretokenizeError(f"{self.f.path}:{self.lineno + 1}: cannot read the file ({exc})") from exc
        self.buf, self._pos, self._k = data, 0, 0
        self._buf_offset = self._bytes  # file offset of ``buf`` (uncompressed)
        self._newlines = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 0x0A)
        self._bytes += len(data)
        self._lines += len(self._newlines)
        return bool(data)

    def _blank_lines(self, starts: np.ndarray, end: int) -> int:
        """How many of the lines of ``buf`` that start at ``starts`` (each ending at the next newline,
        or at ``end``) are empty or whitespace only."""
        buf = self.buf
        first = np.frombuffer(buf, dtype=np.uint8)[starts]
        blank = 0
        for start in starts[np.isin(first, _BLANK_LEAD)].tolist():
            stop = buf.find(b"\n", start, end)
            blank += not buf[start : stop if stop >= 0 else end].strip()
        return blank

    def take(self, n: int) -> LineBlock | None:
        """The next lines up to and including the ``n``-th record (fewer at the end of the file);
        None when no record is left."""
        parts: list[bytes] = []
        offset = size = 0  # the block's byte range
        count = lines_taken = 0
        while count < n and (self._pos < len(self.buf) or self._fill(n - count)):
            buf, newlines, k, pos = self.buf, self._newlines, self._k, self._pos
            if not lines_taken:
                offset = self._buf_offset + pos
            need = n - count
            left = len(newlines) - k  # whole lines left; at EOF a last one may lack its newline
            if need <= left:  # ``need`` whole lines
                lines, end = need, int(newlines[k + need - 1]) + 1
            else:  # the rest of the chunk
                lines, end = left + (not buf.endswith(b"\n")), len(buf)
            # line j > 0 of these starts after the newline that ends line j - 1
            starts = np.concatenate([np.array([pos]), newlines[k : k + lines - 1] + 1])
            blank = self._blank_lines(starts, end)
            size += end - pos
            if not self.ranges:
                parts.append(buf if pos == 0 and end == len(buf) else buf[pos:end])
            self._pos, self._k = end, k + min(lines, left)
            count += lines - blank
            lines_taken += lines
        if not lines_taken:
            return None
        if self.ranges:
            block = LineBlock(self.file_index, self.lineno + 1, b"", count, offset=offset, size=size)
        else:
            block = LineBlock(self.file_index, self.lineno + 1, parts[0] if len(parts) == 1 else b"".join(parts), count)
        self.lineno += lines_taken
        return block if count else None

    def close(self) -> None:
        self.fh.close()


def iter_file_records(f: InputFile) -> Iterator[tuple[int, Any]]:
    """``(line_or_row, payload)`` of one file's records in order."""
    read = {"jsonl": _iter_jsonl, "json": _iter_jsonl, "csv": _iter_csv, "tsv": _iter_csv, "parquet": _iter_parquet}
    return read[f.fmt](f)


def iter_records(files: Sequence[InputFile]) -> Iterator[tuple[int, int, Any]]:
    """All records of all files in order: ``(file_index, line_or_row, payload)``."""
    for index, f in enumerate(files):
        for number, payload in iter_file_records(f):
            yield index, number, payload


# Records skipped per read when a resumed run passes over finished shards (bounds the memory used).
_SKIP_STEP = 100_000


def iter_shard_units(
    files: Sequence[InputFile], per_shard: int, first: int, *, ranges: bool = False
) -> Iterator[tuple[int, list]]:
    """(shard index, its units) in order from shard ``first`` on; shard k holds input records
    ``[k * per_shard, (k + 1) * per_shard)``. A unit is a ``LineBlock`` (JSONL: many records in one
    bytes object, or with ``ranges`` their byte range in a plain file, for a worker process to read)
    or one ``(file_index, number, payload)`` record (other inputs). Earlier records are read and
    dropped."""
    skip = first * per_shard
    index, units, have = first, [], 0
    for fi, f in enumerate(files):
        if is_line_file(f):
            reader = LineReader(f, fi, ranges=ranges)
            try:
                while skip:
                    block = reader.take(min(skip, _SKIP_STEP))
                    if block is None:
                        break
                    skip -= block.records
                while block := reader.take(per_shard - have) if not skip else None:
                    units.append(block)
                    have += block.records
                    if have == per_shard:
                        yield index, units
                        index, units, have = index + 1, [], 0
            finally:
                reader.close()
            continue
        for number, payload in iter_file_records(f):
            if skip:
                skip -= 1
                continue
            units.append((fi, number, payload))
            have += 1
            if have == per_shard:
                yield index, units
                index, units, have = index + 1, [], 0
    if units:
        yield index, units


def location(f: InputFile, number: int) -> str:
    """``file:line`` (``file:row N`` for Parquet, ``file:item N`` for a JSON array) in error messages."""
    if f.fmt == "parquet":
        return f"{f.path}:row {number}"
    if f.fmt == "json" and f.array:
        return f"{f.path}:item {number}"
    return f"{f.path}:{number}"
