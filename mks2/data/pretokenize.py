"""Pretokenize raw records into a directory of Arrow stream shards plus ``manifest.json``.

``pretokenize(...)`` is the library entry (``tools/pretokenize.py`` is its CLI). The output:

- ``shard-NNNNNN.arrow``: shard k holds the usable records among input records
  ``[k * records_per_shard, (k + 1) * records_per_shard)`` in input order. Shards are cut by input
  position, never by worker, so the bytes are identical for every ``workers`` value.
- ``manifest.json``: format version, record kind, tokenizer fingerprint and vocab size, counts, per-shard
  rows and sha256, the command line. Written last and atomically: a directory without one is not a
  dataset (``PretokenizedDataset`` refuses it).
- ``.pretokenize/`` while running: the run's parameters and one small JSON per finished shard, which a
  re-run with ``if_exists="resume"`` uses to continue at the first missing shard. Removed at the end.

Workers: ``workers == 1`` encodes in this process; more start that many processes (spawn), each
loading the tokenizer once. The parent reads the input and keeps at most ``2 * workers`` shards in
flight, so memory stays bounded whatever the input size. JSONL travels as ``LineBlock``s (a shard's
lines in one bytes object, counted with numpy; with workers, a plain file's blocks as byte ranges
that the workers read themselves, so the parent copies and pickles no lines); decoding, parsing (Arrow's JSON reader for
caption/text blocks, ``json.loads`` per record otherwise), encoding (a tokenizer call per ~128k
characters) and Arrow building happen in the workers, per batch of records rather than per record.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from mks2.data.chat import TEMPLATES
from mks2.data.encode import MAX_LISTED_PROBLEMS, EncodeSettings, encode_shard
from mks2.data.errors import BadRecord, PretokenizeError
from mks2.data.formats import KINDS, resolve_fields
from mks2.data.records import iter_shard_units, resolve_inputs
from mks2.data.shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SHARD_TEMPLATE, shard_name
from mks2.data.tokenizer import Tokenizer, file_sha256, load_tokenizer
from mks2.fileio import atomic_write_bytes

STATE_DIR = ".pretokenize"
DEFAULT_RECORDS_PER_SHARD = 50_000
IF_EXISTS = ("refuse", "resume", "overwrite")
ON_ERROR = ("fail", "skip")


# --------------------------------------------------------------------------------------------
# Worker side
# --------------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _worker_init(settings: EncodeSettings, tokenizer_path: str) -> None:
    _WORKER["settings"] = settings
    _WORKER["tokenizer"] = load_tokenizer(tokenizer_path)


def _worker_run(index: int, records: list[tuple[int, int, Any]]) -> dict[str, Any]:
    return encode_shard(_WORKER["settings"], _WORKER["tokenizer"], index, records)


# --------------------------------------------------------------------------------------------
# Output directory states
# --------------------------------------------------------------------------------------------


def _is_temporary(name: str) -> bool:
    """A temporary file of an interrupted atomic write (``mks2.fileio``: ``.<name>.<random>.tmp``;
    older runs wrote ``.<name>.tmp-<pid>``)."""
    return name.startswith(".") and (name.endswith(".tmp") or ".tmp-" in name)


def _is_ours(name: str) -> bool:
    return (
        name in (MANIFEST_NAME, STATE_DIR)
        or (name.startswith("shard-") and name.endswith(".arrow"))
        or _is_temporary(name)
    )


def _clear_ours(out: Path) -> None:
    for entry in out.iterdir():
        if _is_ours(entry.name):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _params_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: was {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _prepare_output(out: Path, params: dict[str, Any], if_exists: str) -> tuple[int, list[dict], dict | None]:
    """Return (first shard to encode, stats of kept shards, finished manifest if already complete)."""
    out.mkdir(parents=True, exist_ok=True)
    entries = [e.name for e in out.iterdir()]
    foreign = sorted(n for n in entries if not _is_ours(n))
    if foreign:
        raise PretokenizeError(
            f"output directory {out} is not empty and holds files pretokenize did not write "
            f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); choose an empty or new directory"
        )
    if not entries:
        return 0, [], None
    manifest_path, params_path = out / MANIFEST_NAME, out / STATE_DIR / "params.json"
    complete = manifest_path.is_file()
    if if_exists == "overwrite":
        _clear_ours(out)
        return 0, [], None
    if if_exists == "refuse":
        what = "a complete dataset (manifest.json)" if complete else "an unfinished pretokenize run"
        hint = "--overwrite to rebuild it" if complete else "--resume to continue it, or --overwrite to start over"
        raise PretokenizeError(f"output directory {out} already holds {what}; pass {hint}")
    # resume
    if complete:
        manifest = json.loads(manifest_path.read_text())
        diff = _params_diff(manifest.get("params", {}), params)
        if diff:
            raise PretokenizeError(
                f"{out} holds a complete dataset built with other settings; pass --overwrite to rebuild it:\n  "
                + "\n  ".join(diff)
            )
        return 0, [], manifest
    if not params_path.is_file():
        raise PretokenizeError(f"{out} holds shards but no run state to resume from; pass --overwrite to start over")
    diff = _params_diff(json.loads(params_path.read_text()), params)
    if diff:
        raise PretokenizeError(
            f"cannot resume into {out}: the unfinished run used other settings (pass --overwrite to start over):\n  "
            + "\n  ".join(diff)
        )
    kept: list[dict] = []
    k = 0
    while True:  # keep the longest prefix of finished, intact shards
        stat_path = out / STATE_DIR / f"{shard_name(k)}.json"
        shard_path = out / shard_name(k)
        if not (stat_path.is_file() and shard_path.is_file()):
            break
        stats = json.loads(stat_path.read_text())
        if file_sha256(shard_path) != stats["sha256"]:
            break
        kept.append(stats)
        k += 1
    for entry in out.iterdir():  # drop everything from the first missing shard on
        name = entry.name
        if name.startswith("shard-") and name.endswith(".arrow") and int(name[6:12]) >= k:
            entry.unlink()
        elif _is_temporary(name):
            entry.unlink()
    for entry in (out / STATE_DIR).iterdir():
        if entry.name.startswith("shard-") and int(entry.name[6:12]) >= k:
            entry.unlink()
    return k, kept, None


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Progress:
    def __init__(self, enabled: bool, initial: int):
        from tqdm.auto import tqdm

        self.start = time.perf_counter()
        self.tokens = 0
        self.bar = tqdm(
            desc="pretokenize", unit="rec", unit_scale=True, initial=initial, disable=not enabled, dynamic_ncols=True
        )

    def update(self, stats: dict[str, Any]) -> None:
        self.tokens += stats["tokens"]
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{rate / 1e3:.1f}k tok/s, skipped {stats['skipped']} in last shard", refresh=False)
        self.bar.update(stats["records"])

    def close(self) -> None:
        self.bar.close()


def _run_jobs(
    jobs: Iterator[tuple[int, list]],
    settings: EncodeSettings,
    tokenizer: Tokenizer,
    tokenizer_path: str,
    workers: int,
    on_done,
) -> None:
    """Encode every job, calling ``on_done(stats)`` in shard order. The first BadRecord (in input order,
    as the jobs are consumed in order) propagates."""
    if workers == 1:
        for index, records in jobs:
            on_done(encode_shard(settings, tokenizer, index, records))
        return
    import multiprocessing as mp

    # spawn: the parent may hold threads (tqdm, torch) that make fork unsafe.
    ctx = mp.get_context("spawn")
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init, initargs=(settings, tokenizer_path))
    pending: deque[Future] = deque()
    try:
        for index, records in jobs:
            pending.append(pool.submit(_worker_run, index, records))
            while len(pending) >= 2 * workers:
                on_done(pending.popleft().result())
        while pending:
            on_done(pending.popleft().result())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def pretokenize(
    inputs: Sequence[str],
    *,
    fmt: str,
    tokenizer: str,
    output: str,
    workers: int = 1,
    on_error: str = "fail",
    image_root: str | None = None,
    fields: dict[str, str] | None = None,
    chat_template: str = "llama2",
    max_tokens: int | None = None,
    check_images: bool = True,
    if_exists: str = "refuse",
    records_per_shard: int = DEFAULT_RECORDS_PER_SHARD,
    system_prompt: str | None = None,
    image_token: str = "<image>",
    image_token_id: int = -200,
    progress: bool = True,
    command: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Pretokenize ``inputs`` (files or globs) of record kind ``fmt`` into ``output``; return the manifest.

    ``on_error``: ``fail`` stops at the first bad record (``PretokenizeError`` naming file:line and the
    reason; no manifest) or ``skip`` drops bad records, counting them and listing the first few in the
    manifest. ``if_exists``: what to do when ``output`` already holds a run: ``refuse`` (default),
    ``resume`` (continue at the first missing shard; a complete dataset with the same settings is
    returned as is; ``on_error`` may change, e.g. to skip the record that stopped a run) or
    ``overwrite``. ``max_tokens``: records longer than this (BOS/EOS included, an
    image placeholder counted once) are bad records. ``command``: recorded in the manifest (defaults
    to ``sys.argv``). ``check_images`` (default on, as in the CLI): every image of an image kind
    (caption, llava) must exist under ``image_root`` and decode, else the record is bad (a missing file
    then stops here, not the training run at the step that meets it); ``False`` is the explicit opt-out
    (the CLI's ``--no-check-images``) for images that are checked elsewhere or not there yet."""
    problems = []
    if fmt not in KINDS:
        problems.append(f"unknown format {fmt!r} (allowed: {', '.join(KINDS)})")
    if on_error not in ON_ERROR:
        problems.append(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
    if if_exists not in IF_EXISTS:
        problems.append(f"if_exists must be one of {', '.join(IF_EXISTS)}, got {if_exists!r}")
    if chat_template not in TEMPLATES:
        problems.append(f"unknown chat template {chat_template!r} (allowed: {', '.join(TEMPLATES)})")
    if workers < 1:
        problems.append(f"workers must be >= 1, got {workers}")
    if records_per_shard < 1:
        problems.append(f"records_per_shard must be >= 1, got {records_per_shard}")
    if max_tokens is not None and max_tokens < 3:
        problems.append(f"max_tokens must be >= 3 (BOS, one token, EOS), got {max_tokens}")
    if image_token_id >= 0:
        problems.append(f"image_token_id must be negative (never a vocabulary id), got {image_token_id}")
    if image_root is not None and not os.path.isdir(os.path.expanduser(image_root)):
        problems.append(f"image root is not a directory: {image_root}")
    if problems:
        raise PretokenizeError("; ".join(problems))
    try:
        field_map = resolve_fields(fmt, fields)
    except ValueError as exc:
        raise PretokenizeError(str(exc)) from exc
    root = os.path.abspath(os.path.expanduser(image_root)) if image_root else None

    files = resolve_inputs(inputs)
    tok = load_tokenizer(tokenizer)
    out = Path(output).expanduser().resolve()
    params = {
        "format_version": FORMAT_VERSION,
        "kind": fmt,
        "fields": field_map,
        "chat_template": chat_template if fmt in ("alpaca", "llava") else None,
        "system_prompt": system_prompt,
        "image_token": image_token,
        "image_token_id": image_token_id,
        "image_root": root,
        "max_tokens": max_tokens,
        "check_images": check_images,
        "records_per_shard": records_per_shard,
        "tokenizer_fingerprint": tok.fingerprint,
        "inputs": [{"path": f.path, "bytes": f.size} for f in files],
    }
    first, done, finished = _prepare_output(out, params, if_exists)
    if finished is not None:
        return finished
    (out / STATE_DIR).mkdir(exist_ok=True)
    atomic_write_bytes(out / STATE_DIR / "params.json", json.dumps(params, indent=1).encode())

    settings = EncodeSettings(
        kind=fmt,
        fields=field_map,
        template=chat_template,
        system_prompt=system_prompt,
        image_token=image_token,
        image_token_id=image_token_id,
        image_root=root,
        check_images=check_images,
        max_tokens=max_tokens,
        on_error=on_error,
        files=tuple(files),
        output=str(out),
    )
    bar = _Progress(progress, initial=sum(s["records"] for s in done))
    started = time.perf_counter()

    def on_done(stats: dict[str, Any]) -> None:
        atomic_write_bytes(out / STATE_DIR / f"{stats['file']}.json", json.dumps(stats).encode())
        done.append(stats)
        bar.update(stats)

    try:
        # with workers, plain JSONL travels as byte ranges that each worker reads itself
        units = iter_shard_units(files, records_per_shard, first, ranges=workers > 1)
        _run_jobs(units, settings, tok, tokenizer, workers, on_done)
    except BadRecord as exc:
        raise PretokenizeError(
            f"{exc.where}: {exc.reason}\n(--on-error fail: stopped here, no manifest written; fix the record or "
            "pass --on-error skip to drop bad records)"
        ) from None
    finally:
        bar.close()
    elapsed = time.perf_counter() - started

    read = sum(s["records"] for s in done)
    if read == 0:
        raise PretokenizeError(f"no records found in {', '.join(f.path for f in files)}")
    listed = [p for s in done for p in s["problems"]][:MAX_LISTED_PROBLEMS]
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": fmt,
        "columns": {"input_ids": "list<int32>", "loss_mask": "list<int8>"}
        | ({"image": "string"} if fmt in ("caption", "llava") else {}),
        "tokenizer": tok.describe(),
        "vocab_size": tok.vocab_size,
        "max_token_id": max((s["max_token_id"] for s in done), default=-1),
        "image_token": image_token,
        "image_token_id": image_token_id,
        "image_root": root,
        "counts": {
            "records_read": read,
            "records_written": sum(s["rows"] for s in done),
            "records_skipped": sum(s["skipped"] for s in done),
            "tokens": sum(s["tokens"] for s in done),
            "loss_tokens": sum(s["loss_tokens"] for s in done),
            "images": sum(s["images"] for s in done),
        },
        "skipped_examples": listed,
        "shards": [{k: s[k] for k in ("file", "rows", "tokens", "bytes", "sha256")} for s in done],
        "params": params,
        "on_error": on_error,
        "command": list(command) if command is not None else list(sys.argv),
        "seconds": round(elapsed, 3),
    }
    atomic_write_bytes(out / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
    shutil.rmtree(out / STATE_DIR, ignore_errors=True)
    return manifest


def summary(manifest: dict[str, Any]) -> str:
    """Human-readable summary of a finished run (printed by the CLI)."""
    c = manifest["counts"]
    secs = max(manifest.get("seconds", 0.0), 1e-9)
    lines = [
        f"kind {manifest['kind']}: {c['records_read']} records read, {c['records_written']} written, "
        f"{c['records_skipped']} skipped; {c['tokens']} tokens ({c['loss_tokens']} with loss) in "
        f"{len(manifest['shards'])} shard(s)",
        f"{c['records_read'] / secs:,.0f} records/s, {c['tokens'] / secs:,.0f} tokens/s over {secs:.1f} s",
    ]
    if manifest["skipped_examples"]:
        lines.append("first skipped records:")
        lines += [f"  {p}" for p in manifest["skipped_examples"][:5]]
    return "\n".join(lines)


__all__ = ["DEFAULT_RECORDS_PER_SHARD", "FORMAT_NAME", "MANIFEST_NAME", "SHARD_TEMPLATE", "pretokenize", "summary"]
