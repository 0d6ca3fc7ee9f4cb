"""Turning records into token arrays: pieces -> ids + loss mask, and one whole shard job.

Encoding is batched: all text pieces of a shard go to the tokenizer in one ``encode_batch`` call (the
same call the raw-speed benchmark times), and the ids are gathered into flat int32/int8 arrays with
numpy, so the work per token outside the tokenizer stays small.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mks2.data.chat import Piece
from mks2.data.errors import BadRecord
from mks2.data.formats import KIND_HAS_IMAGE, normalize_image_path, parse_payload, record_pieces
from mks2.data.records import InputFile, RecordProblem, location
from mks2.data.shards import serialize_shard, sha256_bytes, shard_name
from mks2.data.tokenizer import Tokenizer
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
    encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
    special = {"bos": [tokenizer.bos_id], "eos": [tokenizer.eos_id], "image": [image_token_id]}
    chunks: list[list[int]] = []
    flags: list[int] = []
    lengths = np.zeros(len(records), dtype=np.int64)
    for r, rec in enumerate(records):
        n = 0
        for p in rec:
            ids = next(encoded) if p.kind == "text" else special[p.kind]
            chunks.append(ids)
            flags.append(int(p.loss))
            n += len(ids)
        lengths[r] = n
    sizes = np.fromiter((len(c) for c in chunks), dtype=np.int64, count=len(chunks))
    total = int(sizes.sum())
    values = np.fromiter(itertools.chain.from_iterable(chunks), dtype=np.int32, count=total)
    mask = np.repeat(np.asarray(flags, dtype=np.int8), sizes)
    return lengths, values, mask


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


def encode_shard(
    settings: EncodeSettings, tokenizer: Tokenizer, index: int, records: Sequence[tuple[int, int, Any]]
) -> dict[str, Any]:
    """Encode one shard's records, write ``shard-NNNNNN.arrow`` atomically, return its statistics.

    Raises ``BadRecord`` for the first bad record (in input order) when ``on_error == "fail"``."""
    s = settings
    problems: list[tuple[int, str, str]] = []  # (position in shard, where, reason)
    parsed: list[tuple[int, list[Piece], str | None]] = []
    for pos, (fi, number, payload) in enumerate(records):
        try:
            rec = parse_payload(payload)
            pieces, image = record_pieces(
                s.kind, rec, s.fields, template=s.template, system_prompt=s.system_prompt, image_token=s.image_token
            )
            if image is not None:
                image = normalize_image_path(image, s.image_root)
                if s.check_images:
                    check_image(image, s.image_root)
            parsed.append((pos, pieces, image))
        except RecordProblem as exc:
            problems.append((pos, location(s.files[fi], number), str(exc)))
            if s.on_error == "fail":
                break  # nothing after the first bad record matters

    lengths, values, mask = encode_many(tokenizer, [p for _, p, _ in parsed], image_token_id=s.image_token_id)
    keep = np.ones(len(parsed), dtype=bool)
    if s.max_tokens is not None:
        for k in np.flatnonzero(lengths > s.max_tokens):
            pos = parsed[k][0]
            fi, number, _ = records[pos]
            reason = f"over-long record: {int(lengths[k])} tokens > --max-tokens {s.max_tokens}"
            problems.append((pos, location(s.files[fi], number), reason))
            keep[k] = False
    problems.sort()
    if problems and s.on_error == "fail":
        _, where, reason = problems[0]
        raise BadRecord(where, reason)
    if not keep.all():
        token_keep = np.repeat(keep, lengths)
        values, mask, lengths = values[token_keep], mask[token_keep], lengths[keep]
    images = [img for (_, _, img), k in zip(parsed, keep) if k] if KIND_HAS_IMAGE[s.kind] else None

    data = serialize_shard(lengths, values, mask, images)
    name = shard_name(index)
    atomic_write_bytes(Path(s.output) / name, data)
    real = values[values >= 0]  # the image placeholder id is negative
    return {
        "index": index,
        "file": name,
        "rows": int(len(lengths)),
        "records": len(records),
        "skipped": len(problems),
        "tokens": int(len(values)),
        "loss_tokens": int(mask.sum(dtype=np.int64)),
        "images": 0 if images is None else sum(i is not None for i in images),
        "max_token_id": int(real.max()) if len(real) else -1,
        "bytes": len(data),
        "sha256": sha256_bytes(data),
        "problems": [f"{where}: {reason}" for _, where, reason in problems[:MAX_LISTED_PROBLEMS]],
    }
