"""Random access over a pretokenized directory (``manifest.json`` + Arrow stream shards).

Opening checks, in order, each failing with a ``DatasetError`` that names the file:

1. the manifest exists (a directory without one is an unfinished or foreign run) and has our format;
2. every shard exists with the recorded size and row count, and -- unless ``verify_hashes=False``
   (``data.verify_hashes``) -- the recorded sha256; a flipped byte names the shard;
3. the tokenizer fingerprint equals the run's tokenizer, the tokenizer's vocabulary fits the model's
   ``vocab_size``, every token id is below it (scanned with the hashes; else the manifest's recorded
   maximum), and the image placeholder id matches ``model.vision.image_token_id``.

Shards are memory-mapped (``mks2.data.shards.MappedShard``) and a sample is located through its
list columns' Arrow buffers; no access reads more than that sample. ``access`` picks how a row is read
(see ``mks2.data.shards``):

- ``read`` (default): positioned reads into fresh arrays. RSS does not grow with the dataset, and it
  stays fast on datasets far larger than what one process should keep mapped.
- ``view``: zero-copy numpy views into the mapping. Touched pages count in RSS (one fault can map a
  whole large folio), so the dataset watches its resident shared pages and, once they grew by
  ``release_every`` bytes, drops its mappings' pages (``MADV_DONTNEED``; the page cache keeps them).
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from mks2.data.errors import DatasetError
from mks2.data.shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, MappedShard
from mks2.data.tokenizer import file_sha256, tokenizer_fingerprint

_VERIFIED: set[Path] = set()
"""Dataset directories whose shards were hashed on this node during this run (by the node's local rank 0,
``mark_verified``): this process opens them without hashing again."""


def mark_verified(path: str | Path) -> None:
    """Record that the shards of the dataset at ``path`` were verified on this node (sha256 and token ids),
    so :class:`PretokenizedDataset` skips those checks here (sizes and row counts are still checked)."""
    _VERIFIED.add(Path(path).expanduser().resolve())


def read_manifest(directory: str | Path) -> dict[str, Any]:
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise DatasetError(f"dataset directory not found: {d}")
    path = d / MANIFEST_NAME
    if not path.is_file():
        hint = " (an unfinished pretokenize run: re-run it with --resume)" if (d / ".pretokenize").exists() else ""
        raise DatasetError(f"{d}: no {MANIFEST_NAME}, so this is not a complete pretokenized dataset{hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path}: unreadable manifest ({exc})") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(f"{path}: not an mks2 pretokenized dataset (format {manifest.get('format')!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: format version {manifest.get('format_version')} but this mks2 reads version {FORMAT_VERSION}; "
            "re-run tools/pretokenize.py"
        )
    for key in ("kind", "shards", "tokenizer", "vocab_size", "image_token_id", "max_token_id"):
        if key not in manifest:
            raise DatasetError(f"{path}: manifest lacks {key!r}")
    return manifest


class _MappedResidency:
    """Resident file-backed/shared pages of this process (``/proc/self/statm`` field 3), read cheaply
    with ``pread`` on a kept descriptor. A page fault on a file mapping can map far more than the bytes
    read (fault-around, large page-cache folios), so RSS growth is measured, not estimated."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        try:
            self._fd: int | None = os.open("/proc/self/statm", os.O_RDONLY)
        except OSError:
            self._fd = None

    def shared_bytes(self) -> int | None:
        if self._fd is None:
            return None
        return int(os.pread(self._fd, 128, 0).split()[2]) * self._page

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _ensure_open_files(extra: int) -> None:
    """Raise the soft open-files limit when ``extra`` more descriptors would not fit (datasets with
    thousands of shards); fail with a clear message when the hard limit is too low."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    need = in_use + extra + 64
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise DatasetError(
            f"opening {extra // 2} shards needs {need} open files but the hard limit (ulimit -Hn) is {hard}"
        )
    resource.setrlimit(
        resource.RLIMIT_NOFILE, (need if hard == resource.RLIM_INFINITY else max(need, min(hard, 1 << 16)), hard)
    )


_CHECK_EVERY = 8  # accesses between residency checks (a check costs ~3 us; one access can map ~1 MB)


class PretokenizedDataset:
    """Memory-mapped pretokenized dataset. ``ds[i]`` -> ``{"input_ids": int32 [L], "loss_mask": int8 [L],
    "image": str | None}`` (fresh arrays with ``access="read"``, read-only views with ``"view"``).

    ``tokenizer``: the run's tokenizer path (``data.tokenizer``); its fingerprint must match the
    manifest's. ``vocab_size``: the model's (``model.vocab_size``). ``image_token_id``: the model's
    placeholder id. Any of them None skips that check."""

    def __init__(
        self,
        path: str | Path,
        *,
        verify_hashes: bool = True,
        tokenizer: str | Path | None = None,
        vocab_size: int | None = None,
        image_token_id: int | None = None,
        access: str = "read",
        release_every: int = 32 << 20,
    ):
        if access not in ("read", "view"):
            raise ValueError(f"access must be 'read' or 'view', got {access!r}")
        self.access = access
        self.path = Path(path).expanduser().resolve()
        self.manifest = read_manifest(self.path)
        self.kind: str = self.manifest["kind"]
        verify_hashes = verify_hashes and self.path not in _VERIFIED  # hashed on this node already
        self._verify = verify_hashes
        self.release_every = release_every
        self._check_identity(tokenizer, vocab_size, image_token_id)
        self._open(verify_hashes)
        if vocab_size is not None and verify_hashes:
            self._scan_ids(vocab_size)
        self._start_metering()

    def _start_metering(self) -> None:
        self._meter = _MappedResidency()
        self._accesses = self._fallback = 0
        self._baseline = self._meter.shared_bytes() or 0

    # -- opening ------------------------------------------------------------------------------

    def _check_identity(self, tokenizer, vocab_size, image_token_id) -> None:
        m, where = self.manifest, self.path / MANIFEST_NAME
        if tokenizer is not None:
            expected = tokenizer_fingerprint(tokenizer)
            got = m["tokenizer"]["fingerprint"]
            if expected != got:
                raise DatasetError(
                    f"{self.path}: tokenized with {m['tokenizer'].get('path')} (fingerprint {got}) but this run's "
                    f"tokenizer {tokenizer} has fingerprint {expected}; re-run tools/pretokenize.py with it"
                )
        if vocab_size is not None:
            if m["vocab_size"] > vocab_size:
                raise DatasetError(
                    f"{where}: tokenizer vocabulary has {m['vocab_size']} ids but model.vocab_size is {vocab_size}"
                )
            if m["max_token_id"] >= vocab_size:
                raise DatasetError(f"{where}: token id {m['max_token_id']} >= model.vocab_size {vocab_size}")
        if image_token_id is not None and m["image_token_id"] != image_token_id:
            raise DatasetError(
                f"{where}: image placeholder id {m['image_token_id']} but model.vision.image_token_id is "
                f"{image_token_id}; re-run pretokenize with --image-token-id {image_token_id}"
            )

    def _open(self, verify_hashes: bool) -> None:
        _ensure_open_files(2 * len(self.manifest["shards"]))  # a mapping and a read descriptor per shard
        self._shards: list[MappedShard] = []
        starts = [0]
        for entry in self.manifest["shards"]:
            file = self.path / entry["file"]
            if not file.is_file():
                raise DatasetError(f"{file}: shard listed in the manifest is missing")
            size = file.stat().st_size
            if size != entry["bytes"]:
                raise DatasetError(f"{file}: {size} bytes but the manifest records {entry['bytes']} (truncated?)")
            if verify_hashes:
                digest = file_sha256(file)
                if digest != entry["sha256"]:
                    raise DatasetError(
                        f"{file}: sha256 {digest} does not match the manifest ({entry['sha256']}): the shard is "
                        "corrupted or was modified; re-create it (or set data.verify_hashes=false to skip this check)"
                    )
            shard = MappedShard(file)
            if verify_hashes:
                shard.check_offsets()
            if shard.num_rows != entry["rows"]:
                raise DatasetError(f"{file}: {shard.num_rows} rows but the manifest records {entry['rows']}")
            self._shards.append(shard)
            starts.append(starts[-1] + shard.num_rows)
        self._starts = starts
        self.has_images = any(s.has_image_column for s in self._shards)

    def _scan_ids(self, vocab_size: int) -> None:
        placeholder = self.manifest["image_token_id"]
        for shard in self._shards:
            for values in shard.iter_values():
                if not len(values):
                    continue
                hi, lo = int(values.max()), int(values.min())
                if hi >= vocab_size or (lo < 0 and np.any((values < 0) & (values != placeholder))):
                    bad = hi if hi >= vocab_size else int(values[(values < 0) & (values != placeholder)][0])
                    raise DatasetError(f"{shard.path}: token id {bad} outside [0, model.vocab_size={vocab_size})")
            shard.release_pages()

    # -- access -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self._starts[-1]

    def _locate(self, i: int) -> tuple[MappedShard, int]:
        if not 0 <= i < self._starts[-1]:
            raise IndexError(f"index {i} out of range for {self.path} ({len(self)} samples)")
        k = bisect.bisect_right(self._starts, i) - 1
        return self._shards[k], i - self._starts[k]

    def _touch(self) -> None:
        if self.release_every and self.access == "view":
            self._accesses += 1
            if self._accesses >= _CHECK_EVERY:
                self._check_residency()

    def __getitem__(self, i: int) -> dict[str, Any]:
        """``{"input_ids": int32 [L], "loss_mask": int8 [L], "image": str | None}``."""
        shard, j = self._locate(int(i))
        if self.access == "read":
            ids, mask = shard.read_row(j)
            image = shard.read_image(j) if shard.has_image_column else None
        else:
            ids, mask = shard.row(j)
            image = shard.image(j) if shard.has_image_column else None
            self._touch()
        return {"input_ids": ids, "loss_mask": mask, "image": image}

    def length(self, i: int) -> int:
        """Tokens of sample ``i`` (the image placeholder counted once)."""
        shard, j = self._locate(int(i))
        if self.access == "read":
            return shard.read_length(j)
        self._touch()
        return shard.length(j)

    def has_image(self, i: int) -> bool:
        shard, j = self._locate(int(i))
        return shard.read_has_image(j)

    def _check_residency(self) -> None:
        self._accesses = 0
        now = self._meter.shared_bytes()
        if now is None:  # no /proc: release on a fixed access count instead
            self._fallback += _CHECK_EVERY
            if self._fallback * 256 << 10 >= self.release_every:
                self._fallback = 0
                self.release_pages()
        elif now - self._baseline >= self.release_every:
            self.release_pages()
        elif now < self._baseline:  # something else unmapped pages
            self._baseline = now

    def release_pages(self) -> None:
        """Drop this process's resident pages of every shard mapping (the page cache keeps them)."""
        for s in self._shards:
            s.release_pages()
        self._baseline = self._meter.shared_bytes() or 0

    # -- pickling (spawned DataLoader workers re-open the maps without re-verifying) -----------

    def __getstate__(self) -> dict[str, Any]:
        return {"path": str(self.path), "access": self.access, "release_every": self.release_every}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = Path(state["path"])
        self.release_every = state["release_every"]
        self.access = state["access"]
        self.manifest = read_manifest(self.path)
        self.kind = self.manifest["kind"]
        self._verify = False
        self._open(verify_hashes=False)
        self._start_metering()

    def __repr__(self) -> str:
        return f"PretokenizedDataset({str(self.path)!r}, kind={self.kind}, samples={len(self)})"
