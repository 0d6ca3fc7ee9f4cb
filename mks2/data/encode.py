"""Turning records into token arrays: pieces -> ids + loss mask, and one whole shard job.

Encoding is batched: the text pieces of a shard go to the tokenizer in ``encode_batch`` calls of about
``ENCODE_CHUNK_CHARS`` characters each (the call the raw-speed benchmark times), and each call's id
lists are flattened into an int32 array at once, while they are still in the CPU cache; records are
then assembled from the flat ids with whole-array numpy operations, so the work per token outside the
tokenizer stays small.
"""

from __future__ import annotations

import bisect
import contextlib
import gc
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from mks2.data.chat import Piece
from mks2.data.errors import BadRecord
from mks2.data.formats import KIND_HAS_IMAGE, normalize_image_path, parse_payload, record_pieces
from mks2.data.records import InputFile, LineBlock, RecordProblem, location
from mks2.data.shards import serialize_shard, sha256_bytes, shard_name
from mks2.data.tokenizer import Tokenizer, flatten_ids, frame_ids
from mks2.fileio import atomic_write_bytes

# Bad records listed by name per shard (and in the manifest); the rest are only counted.
MAX_LISTED_PROBLEMS = 20


def encode_pieces(
    tokenizer: Tokenizer, pieces: Sequence[Piece], *, image_token_id: int = -200
) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [L], loss_mask int8 [L]) of one record's pieces."""
    lengths, values, mask = encode_many(tokenizer, [pieces], image_token_id=image_token_id)
    return values, mask


def encode_many(
    tokenizer: Tokenizer, records: Sequence[Sequence[Piece]], *, image_token_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Encode several records at once: (lengths int64 [R], values int32 [T], loss_mask int8 [T])."""
    texts = [p.text for rec in records for p in rec if p.kind == "text"]
    text_len, flat = encode_flat(tokenizer, texts)  # [number of text pieces], [sum text_len]
    special = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "image": image_token_id}
    sizes: list[int] = []  # tokens of each piece, in record order
    flags: list[int] = []  # loss flag of each piece
    is_text: list[bool] = []
    fixed_ids: list[int] = []  # the id of each non-text piece, in order
    lengths = np.zeros(len(records), dtype=np.int64)
    text_sizes = text_len.tolist()
    t = 0
    for r, rec in enumerate(records):
        n = 0
        for p in rec:
            if p.kind == "text":
                size = text_sizes[t]
                t += 1
                is_text.append(True)
            else:
                size = 1
                fixed_ids.append(special[p.kind])
                is_text.append(False)
            sizes.append(size)
            flags.append(int(p.loss))
            n += size
        lengths[r] = n
    size_arr = np.asarray(sizes, dtype=np.int64)
    token_is_text = np.repeat(np.asarray(is_text, dtype=bool), size_arr)  # [T]
    values = np.empty(len(token_is_text), dtype=np.int32)
    values[token_is_text] = flat
    values[~token_is_text] = np.asarray(fixed_ids, dtype=np.int32)
    mask = np.repeat(np.asarray(flags, dtype=np.int8), size_arr)
    return lengths, values, mask


# Characters of text per tokenizer call. Small enough that a call's output (id lists of ~28-byte int
# objects where the tokenizer has no array output) is flattened while still in cache, large enough
# that the per-call overhead does not count; the raw-speed benchmark's loop (1,000 captions a call)
# is this size.
ENCODE_CHUNK_CHARS = 1 << 17


def encode_flat(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token counts int64 [N] and the ids of all texts concatenated, int32 [sum counts]. One tokenizer
    call per ~``ENCODE_CHUNK_CHARS`` characters, each flattened at once: encoding a whole shard in one
    call kept ~1.4M int objects alive and ran the tokenizer ~12% slower."""
    # Any object with encode_batch is a tokenizer here (the evaluator's and tests' duck-typed ones too).
    encode = getattr(tokenizer, "encode_arrays", None) or (lambda chunk: flatten_ids(tokenizer.encode_batch(chunk)))
    return _encode_chunked(texts, encode)


def encode_framed(tokenizer: Tokenizer, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token counts int64 [N] (BOS/EOS not counted) and every text as ``BOS ids EOS``, concatenated:
    int32 [sum counts + 2 N]. A tokenizer call per ~``ENCODE_CHUNK_CHARS`` characters like
    ``encode_flat``; sentencepiece frames the texts itself."""
    encode = getattr(tokenizer, "encode_framed", None)
    if encode is None:  # a duck-typed tokenizer
        counts, ids = encode_flat(tokenizer, texts)
        return counts, frame_ids(counts, ids, tokenizer.bos_id, tokenizer.eos_id)
    if not texts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    with _cyclic_gc_paused():
        return encode(texts, _chunks(texts))


def _chunks(texts: Sequence[str]) -> list[tuple[int, int]]:
    """``(lo, hi)`` ranges of ``texts`` of ~``ENCODE_CHUNK_CHARS`` characters each, in order: chunk k
    ends after the last text that ends within (k + 1) * ENCODE_CHUNK_CHARS characters (at least one
    text per chunk)."""
    chars = np.cumsum(np.fromiter(map(len, texts), dtype=np.int64, count=len(texts)))  # [N]
    marks = np.arange(ENCODE_CHUNK_CHARS, int(chars[-1]), ENCODE_CHUNK_CHARS)
    cuts = np.unique(np.searchsorted(chars, marks, side="right")).tolist()
    bounds = [0, *(c for c in cuts if 0 < c < len(texts)), len(texts)]
    return list(zip(bounds[:-1], bounds[1:]))


def _encode_chunked(texts: Sequence[str], encode) -> tuple[np.ndarray, np.ndarray]:
    """``encode(chunk) -> (counts [n], ids)`` over the ``_chunks`` of ``texts``, concatenated:
    (counts int64 [N], ids int32)."""
    if not texts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
    counts: list[np.ndarray] = []
    ids: list[np.ndarray] = []
    with _cyclic_gc_paused():
        for lo, hi in _chunks(texts):
            n, flat = encode(texts[lo:hi])
            counts.append(n)
            ids.append(flat)
    return np.concatenate(counts), np.concatenate(ids)


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Pause Python's cycle collector while encoding: each call creates ~1,000 short-lived container
    objects (buffer views or id lists), which trigger collections that traverse every object of the
    process (4 full ones, ~0.27 CPU-s, on 200k captions: ~6% of the encoding). The loop makes no
    reference cycles, so nothing is left for the collector; its state is restored afterwards."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class EncodeSettings:
    """Everything a worker needs to encode a shard (picklable; sent once per worker)."""

    kind: str
    fields: dict[str, str]
    template: str
    system_prompt: str | None
    image_token: str
    image_token_id: int
    image_root: str | None
    check_images: bool
    max_tokens: int | None
    on_error: str  # fail | skip
    files: tuple[InputFile, ...]
    output: str


def check_image(path: str, image_root: str | None) -> None:
    full = os.path.join(image_root, path) if image_root else path
    if not os.path.isfile(full):
        raise RecordProblem(f"image not found: {full}")
    from PIL import Image

    try:
        with Image.open(full) as im:
            im.load()
    except Exception as exc:  # PIL raises many types for undecodable files
        raise RecordProblem(f"image cannot be decoded: {full} ({type(exc).__name__}: {exc})") from None


FIXED_KINDS = ("caption", "text")  # one text span between fixed tokens: encoded without pieces


def encode_fixed(
    tokenizer: Tokenizer, texts: Sequence[str], *, with_image: bool, image_token_id: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Records ``<s> [<image>] text </s>`` (loss on the text and EOS), as ``record_pieces`` builds for
    the caption and text kinds, encoded in a few tokenizer calls and assembled with whole-array numpy
    operations instead of a Python loop per record: (lengths int64 [R], values int32 [T], loss_mask
    int8 [T])."""
    text_len, framed = encode_framed(tokenizer, texts)  # [R], [sum text_len + 2 R]: BOS text EOS each
    lengths = text_len + (3 if with_image else 2)
    ends = np.cumsum(lengths)  # [R] one past each row's EOS
    starts = ends - lengths
    total = int(ends[-1]) if len(ends) else 0
    mask = np.ones(total, dtype=np.int8)  # loss on the text and EOS, not on BOS or the image
    mask[starts] = 0
    if not with_image:
        return lengths, framed, mask
    mask[starts + 1] = 0
    values = np.empty(total, dtype=np.int32)
    from_framed = mask.view(bool).copy()  # [T] every token but the image placeholders
    from_framed[starts] = True
    values[from_framed] = framed
    values[starts + 1] = image_token_id
    return lengths, values, mask


def _read_block_columns(block: LineBlock, names: Sequence[str]) -> list[pa.StringArray] | None:
    """The string columns ``names`` of every record of ``block`` parsed by Arrow's C++ JSON reader, or
    None when the block holds anything the per-record path (Python's ``json.loads``, whose verdict
    defines a bad record) might judge differently: a parse error, a byte order mark (Arrow skips it,
    Python refuses it), a row count other than the block's record count (Arrow reads two objects on
    one line as two rows), a missing/null field or one that is not a string (the explicit schema
    makes Arrow refuse those), invalid UTF-8 anywhere in the block. Arrow refuses lone surrogate
    escapes, raw control characters in strings and duplicate keys itself."""
    data = block.data
    if len(set(names)) != len(names):
        return None
    # ASCII (the common case, checked at memory speed) holds neither a byte order mark nor bad UTF-8
    if not data.isascii():
        if b"\xef\xbb\xbf" in data:
            return None
        try:  # Arrow checks the UTF-8 of the columns it keeps only (and only when they are read)
            data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    import pyarrow.json as pj

    schema = pa.schema([(n, pa.string()) for n in names])
    try:
        table = pj.read_json(
            pa.BufferReader(data),
            # one block for the whole text (no line may straddle two) and no threads: one worker per core
            read_options=pj.ReadOptions(use_threads=False, block_size=min(max(len(data), 1 << 16), (1 << 31) - 1)),
            parse_options=pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        )
    except Exception:  # ArrowInvalid and friends: leave the verdict to the per-record path
        return None
    if table.num_rows != block.records:
        return None
    columns = [table.column(n).combine_chunks() for n in names]
    if any(c.null_count for c in columns):
        return None
    return columns


# First UTF-8 byte of every character that ``str.isspace`` accepts (the ASCII ones, U+0085, U+00A0,
# U+1680, U+2000-U+200A, U+2028, U+2029, U+202F, U+205F, U+3000; tests check the set): a string
# whose first byte is none of these is not whitespace only.
_SPACE_LEAD_BYTES = np.array([0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20, 0xC2, 0xE1, 0xE2, 0xE3])


def _string_views(arr: pa.StringArray) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int32 [n + 1], UTF-8 bytes uint8) of a string array without nulls: numpy views of
    its buffers."""
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32, count=len(arr) + 1, offset=4 * arr.offset)
    data = arr.buffers()[2]
    return offsets, np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)


def _first_bytes(arr: pa.StringArray) -> np.ndarray | None:
    """The first UTF-8 byte of every string of ``arr`` (uint8 [n]), or None when one is empty."""
    offsets, data = _string_views(arr)
    starts = offsets[:-1]
    if (offsets[1:] == starts).any():
        return None
    return data[starts]


def _fixed_images(s: EncodeSettings, images: pa.StringArray) -> pa.StringArray | list[str] | None:
    """The image column of a caption block as ``record_pieces`` would take it, or None when a path is
    empty or whitespace only (``get_str``'s "is empty": the per-record path reports it). Stays an
    Arrow array (no Python string per record, written as is by ``serialize_shard``) unless the images
    are to be checked or an absolute path is to be made relative to the image root."""
    first = _first_bytes(images)
    if first is None:
        return None
    # whitespace only: decided by str.isspace for the few whose first character may be a space
    for k in np.flatnonzero(np.isin(first, _SPACE_LEAD_BYTES)).tolist():
        if images[k].as_py().isspace():
            return None
    absolute = os.name != "posix" or bool((first == ord("/")).any())  # os.path.isabs on POSIX
    if not s.check_images and not (s.image_root and absolute):
        return images
    paths = images.to_pylist()
    if s.image_root:
        paths = [normalize_image_path(i, s.image_root) for i in paths]
    return paths


def _fast_fixed_block(
    s: EncodeSettings, block: LineBlock
) -> tuple[list[str], pa.StringArray | list[str] | None] | None:
    """(texts, images or None) of a JSONL block of caption/text records when every record is good as
    far as parsing and fields go (exactly what ``record_pieces`` would return; the images as an Arrow
    array where no Python string is needed, see ``_fixed_images``); None sends the block to the
    per-record path, which reports each bad record by line."""
    if s.kind == "caption":
        got = _read_block_columns(block, [s.fields["image"], s.fields["caption"]])
        if got is None:
            return None
        image_column, captions = got
        texts = list(map(str.strip, captions.to_pylist()))
        # an empty field (get_str's "is empty"); str.isspace tests the set str.strip() removes
        if not all(texts):
            return None
        images = _fixed_images(s, image_column)
        return None if images is None else (texts, images)
    got = _read_block_columns(block, [s.fields["text"]])
    if got is None:
        return None
    texts = got[0].to_pylist()
    if not all(texts) or any(map(str.isspace, texts)):
        return None
    return texts, None


def _parse_record(s: EncodeSettings, payload: Any) -> tuple[list[Piece], str | None]:
    """Pieces and image of one record (RecordProblem when it is bad), image checked if asked."""
    rec = parse_payload(payload)
    pieces, image = record_pieces(
        s.kind, rec, s.fields, template=s.template, system_prompt=s.system_prompt, image_token=s.image_token
    )
    if image is not None:
        image = normalize_image_path(image, s.image_root)
        if s.check_images:
            check_image(image, s.image_root)
    return pieces, image


def _unit_records(unit: LineBlock | tuple[int, int, Any]) -> Iterator[tuple[int, int, Any]]:
    if isinstance(unit, LineBlock):
        return ((unit.file_index, number, line) for number, line in unit.lines())
    return iter((unit,))


def _locator(s: EncodeSettings, units: Sequence[LineBlock | tuple[int, int, Any]]):
    """position in shard -> ``file:line``. Only called for bad records; the unit is found by
    bisection and a block's line numbers are recounted once, at its first bad record (a walk and a
    recount per bad record made a shard with many of them, e.g. ``--max-tokens`` dropping most,
    quadratic: minutes for 50k records)."""
    firsts: list[int] = []  # position in shard of each unit's first record
    pos = 0
    for unit in units:
        firsts.append(pos)
        pos += unit.records if isinstance(unit, LineBlock) else 1
    numbers: dict[int, list[int]] = {}  # unit index -> line number of each of its records

    def where(pos: int) -> str:
        k = bisect.bisect_right(firsts, pos) - 1
        unit = units[k]
        if not isinstance(unit, LineBlock):
            return location(s.files[unit[0]], unit[1])
        if k not in numbers:
            numbers[k] = [number for number, _ in unit.lines()]
        return location(s.files[unit.file_index], numbers[k][pos - firsts[k]])

    return where


def encode_shard(
    settings: EncodeSettings, tokenizer: Tokenizer, index: int, units: Sequence[LineBlock | tuple[int, int, Any]]
) -> dict[str, Any]:
    """Encode one shard's records, write ``shard-NNNNNN.arrow`` atomically, return its statistics.

    ``units``: ``LineBlock``s (JSONL lines) and single ``(file_index, number, payload)`` records, in
    input order. Caption and text records of a block are parsed by Arrow and encoded in one batch with
    no per-record Python beyond a few list comprehensions; any block the fast path cannot vouch for,
    and the other kinds and inputs, go record by record (parse, pieces) with the tokenizer still
    called per ~``ENCODE_CHUNK_CHARS`` of text, not per record. Raises ``BadRecord`` for the first
    bad record (in input order) when ``on_error == "fail"``."""
    s = settings
    units = [u.load(s.files) if isinstance(u, LineBlock) else u for u in units]
    fixed = s.kind in FIXED_KINDS
    problems: list[tuple[int, str, str]] = []  # (position in shard, where, reason)
    # position in shard of each parsed record: int64 arrays for blocks, lists for single records
    positions: list[Any] = []
    texts: list[str] = []  # fixed kinds: the text span of each parsed record
    pieces_list: list[list[Piece]] = []  # other kinds: the pieces of each parsed record
    # image column parts in record order: Arrow arrays of fast blocks, lists of single records' images
    image_parts: list[pa.StringArray | list[str | None]] = []
    where = _locator(s, units)
    pos = 0
    stop = False
    for unit in units:
        fast = _fast_fixed_block(s, unit) if fixed and isinstance(unit, LineBlock) else None
        if fast is not None:
            block_texts, block_images = fast
            if block_images is not None and s.check_images:
                good = []
                for k, image in enumerate(block_images):
                    try:
                        check_image(image, s.image_root)
                        good.append(k)
                    except RecordProblem as exc:
                        problems.append((pos + k, where(pos + k), str(exc)))
                        if s.on_error == "fail":
                            stop = True
                            break
                block_texts = [block_texts[k] for k in good]
                block_images = [block_images[k] for k in good]
                positions.append([pos + k for k in good])
            else:
                positions.append(np.arange(pos, pos + len(block_texts), dtype=np.int64))
            texts += block_texts
            if block_images is not None:  # caption; the text kind has no image column
                image_parts.append(block_images)
            pos += unit.records
        else:
            singles: list[int] = []
            positions.append(singles)
            images: list[str | None] = []
            image_parts.append(images)
            for fi, number, payload in _unit_records(unit):
                try:
                    pieces, image = _parse_record(s, payload)
                except RecordProblem as exc:
                    problems.append((pos, location(s.files[fi], number), str(exc)))
                    if s.on_error == "fail":
                        stop = True  # nothing after the first bad record matters
                        break
                else:
                    singles.append(pos)
                    if fixed:
                        texts.append(next(p.text for p in pieces if p.kind == "text"))
                    else:
                        pieces_list.append(pieces)
                    images.append(image)
                pos += 1
        if stop:
            break
    records = sum(u.records if isinstance(u, LineBlock) else 1 for u in units)

    if fixed:
        lengths, values, mask = encode_fixed(
            tokenizer, texts, with_image=s.kind == "caption", image_token_id=s.image_token_id
        )
    else:
        lengths, values, mask = encode_many(tokenizer, pieces_list, image_token_id=s.image_token_id)
    position = (
        np.concatenate([np.asarray(p, dtype=np.int64) for p in positions]) if positions else np.zeros(0, np.int64)
    )
    keep = np.ones(len(position), dtype=bool)
    if s.max_tokens is not None:
        for k in np.flatnonzero(lengths > s.max_tokens):
            reason = f"over-long record: {int(lengths[k])} tokens > --max-tokens {s.max_tokens}"
            at_pos = int(position[k])
            problems.append((at_pos, where(at_pos), reason))
            keep[k] = False
    problems.sort()
    if problems and s.on_error == "fail":
        _, at, reason = problems[0]
        raise BadRecord(at, reason)
    if not keep.all():
        token_keep = np.repeat(keep, lengths)
        values, mask, lengths = values[token_keep], mask[token_keep], lengths[keep]
    out_images = _image_column(image_parts, keep) if KIND_HAS_IMAGE[s.kind] else None

    data = serialize_shard(lengths, values, mask, out_images)
    name = shard_name(index)
    atomic_write_bytes(Path(s.output) / name, data)
    # the largest vocabulary id: the image placeholder id is negative, so it is the overall maximum
    # unless the shard holds no non-negative id at all
    top = int(values.max()) if len(values) else -1
    return {
        "index": index,
        "file": name,
        "rows": int(len(lengths)),
        "records": records,
        "skipped": len(problems),
        "tokens": int(len(values)),
        "loss_tokens": int(mask.sum(dtype=np.int64)),
        "images": _image_count(out_images),
        "max_token_id": max(top, -1),
        "bytes": len(data),
        "sha256": sha256_bytes(data),
        "problems": [f"{at}: {reason}" for _, at, reason in problems[:MAX_LISTED_PROBLEMS]],
    }


def _image_column(
    parts: Sequence[pa.StringArray | list[str | None]], keep: np.ndarray
) -> pa.StringArray | list[str | None]:
    """The kept rows' images: one Arrow array when every part is one (the fast path of every block),
    else a list of str/None (``serialize_shard`` writes the same bytes either way)."""
    if parts and keep.all() and all(isinstance(p, pa.Array) for p in parts):
        return parts[0] if len(parts) == 1 else pa.concat_arrays(parts)
    images = [i for p in parts for i in (p.to_pylist() if isinstance(p, pa.Array) else p)]
    return images if keep.all() else [img for img, k in zip(images, keep) if k]


def _image_count(images: pa.StringArray | list[str | None] | None) -> int:
    if images is None:
        return 0
    if isinstance(images, pa.Array):
        return len(images) - images.null_count
    return len(images) - images.count(None)
