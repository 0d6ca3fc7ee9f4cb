"""Build the demo world into a cache directory: images, raw JSONL, evaluation sets, tokenizer, vision
tower and pretokenized shards. Deterministic (fixed seeds, single-threaded trainers, no timestamps in
our files) and safe under concurrency (an exclusive file lock; others wait, then reuse).

Layout of ``<cache_dir>/demo-v<VERSION>-<fingerprint>/`` (the fingerprint hashes the generator's and
the pretokenizer's source, so a changed generator builds a fresh directory)::

    images/train/NNNNNN.png, images/heldout/NNNNNN.png    96x96 scenes (image root of every shard)
    raw/{captions,captions_heldout,text_sft,mm_sft,text_pretrain}.jsonl
    eval/{mc_heldout,mc_seen,open_heldout,open_seen}.jsonl
    tokenizer/tokenizer.model (+ tokenizer_config.json: loads with AutoTokenizer too)
    vision/ (transformers CLIPVisionModel: config.json, model.safetensors, preprocessor_config.json)
    shards/{captions,captions_heldout,text_pretrain,text_sft-<template>,mm_sft-<template>}/
    world.json                                            the objects and which are held out
    BUILD.json                                            written last: marks the build complete

Why build in place rather than in a temp dir renamed at the end: shard manifests record absolute
paths (image root, tokenizer), which must name the final directory. Completeness is instead carried
by ``BUILD.json``, written last and atomically; a directory without it is an interrupted build, which
the next builder (holding the lock) deletes and redoes. Readers trust only ``BUILD.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

from mks2.demo import corpus
from mks2.demo.render import render, save_png
from mks2.demo.tokenizer import chat_lines, train_tokenizer
from mks2.demo.vision import pretrain_tower, save_tower
from mks2.demo.world import COLOURS, OBJECTS, POSITIONS, SHAPES, SIZES, WORLD_SEED
from mks2.fileio import atomic_write_text

log = logging.getLogger("mks2.demo")

DEMO_VERSION = "1"
MARKER = "BUILD.json"
CHAT_TEMPLATES = ("llama2", "vicuna_v1")
MAX_RECORD_TOKENS = 128
"""Upper bound on any record's tokens (image placeholder counted once); the largest actual length of
each dataset is recorded in BUILD.json (``max_record_tokens``)."""
# Sources whose change alters what the build writes (demo generator + pretokenizer).
_DATA_SOURCES = ("pretokenize.py", "encode.py", "chat.py", "formats.py", "records.py", "shards.py", "tokenizer.py")


@dataclass(frozen=True, kw_only=True)
class DemoSizes:
    """How much of each dataset to generate."""

    seed: int = 0
    n_train_images: int = 4000
    n_heldout_images: int = 100
    """Retrieval gallery: two-object scenes whose content never occurs in training."""
    n_text_sft: int = 3000
    n_mm_sft: int = 2000
    """Conversations about the first n training images."""
    n_text_pretrain: int = 2000


SIZES_DEFAULT = DemoSizes()


# Demo modules that use a build but do not shape it: editing them must not force a rebuild.
_NOT_BUILD_INPUTS = frozenset({"base_lm.py", "__main__.py"})


def fingerprint() -> str:
    """Short hash of the demo generator and pretokenizer sources (+ DEMO_VERSION)."""
    h = hashlib.sha256(f"mks2-demo-{DEMO_VERSION}\n".encode())
    here = Path(__file__).resolve().parent
    data = here.parent / "data"
    own = [f for f in sorted(here.glob("*.py")) if f.name not in _NOT_BUILD_INPUTS]
    files = own + [data / n for n in _DATA_SOURCES if (data / n).is_file()]
    for f in files:
        h.update(f"{f.parent.name}/{f.name}\n".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def build_dir_name() -> str:
    return f"demo-v{DEMO_VERSION}-{fingerprint()}"


def is_complete(root: Path) -> bool:
    return (root / MARKER).is_file()


# ------------------------------------------------------------------------------------------------
# Locking
# ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing); logs when it has to wait.
    The kernel drops the lock if the holder dies, so a killed build never blocks others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            # warning level: shown even when the caller configured no logging (lastResort handler)
            log.warning("demo: another process holds %s; waiting for its build", path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def ensure_built(cache_dir: str | os.PathLike, *, progress: bool = True) -> tuple[Path, bool]:
    """Return (demo root, whether this call built it). Builds under ``cache_dir`` on first use; a
    concurrent caller waits on the lock and then reuses the finished build."""
    cache = Path(cache_dir).expanduser().resolve()
    root = cache / build_dir_name()
    if is_complete(root):
        return root, False
    with exclusive_lock(cache / f".{root.name}.lock"):
        if is_complete(root):  # built by whoever held the lock before us
            return root, False
        if root.exists():
            log.warning("demo: removing interrupted build %s", root)
            shutil.rmtree(root)
        build(root, progress=progress)
    prune_old_builds(cache, keep=KEEP_BUILDS, current=root)
    return root, True


KEEP_BUILDS = 3
"""Complete demo builds kept in a cache directory (the newest, by when they were finished; the one just
built always stays): builds of other source versions are useful to other checkouts for a while, not forever."""


def prune_old_builds(cache: Path, *, keep: int, current: Path) -> list[Path]:
    """Delete the complete ``demo-v*`` builds in ``cache`` beyond the ``keep`` newest (``current`` is never
    deleted, nor a build whose lock another process holds: one being rebuilt). Returns the deleted ones."""
    builds = sorted(
        (d for d in cache.glob("demo-v*-*") if d.is_dir() and is_complete(d) and d != current),
        key=lambda d: (d / MARKER).stat().st_mtime,
        reverse=True,
    )
    removed = []
    for old in builds[max(keep - 1, 0) :]:  # the current build takes one of the places
        lock = cache / f".{old.name}.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            log.info("demo: removing old build %s (keeping the newest %d)", old, keep)
            shutil.rmtree(old, ignore_errors=True)
            lock.unlink(missing_ok=True)
            removed.append(old)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
    return removed


# ------------------------------------------------------------------------------------------------
# The build
# ------------------------------------------------------------------------------------------------


def _write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def _write_json_atomic(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _rng(sizes: DemoSizes, name: str) -> random.Random:
    # One independent stream per artefact: changing one dataset's size leaves the others unchanged.
    return random.Random(f"mks2-demo:{sizes.seed}:{name}")


def _tokenizer_sentences(raw: dict[str, list[dict]]) -> list[str]:
    """Training text of the tokenizer: every training record (never evaluation text), the chat
    templates around the instruction data, and every printable ASCII character."""
    sents = [r["caption"] for r in raw["captions"]] + [r["text"] for r in raw["text_pretrain"]]
    pairs = [("\n\n".join(x for x in (r["instruction"], r["input"]) if x), r["output"]) for r in raw["text_sft"]]
    for r in raw["mm_sft"]:
        conv = r["conversations"]
        pairs += [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv), 2)]
    sents += chat_lines(pairs)
    sents.append(" ".join(chr(c) for c in range(33, 127)))
    return sents


def _max_record_tokens(shard_dir: Path) -> int:
    import pyarrow as pa
    import pyarrow.compute as pc

    longest = 0
    for shard in sorted(shard_dir.glob("*.arrow")):
        with pa.memory_map(str(shard)) as f:
            col = pa.ipc.open_stream(f).read_all().column("input_ids")
        longest = max(longest, pc.max(pc.list_value_length(col)).as_py() or 0)
    return longest


def build(root: Path, sizes: DemoSizes = SIZES_DEFAULT, *, progress: bool = True) -> dict:
    """Generate everything into ``root`` (must not exist); returns the BUILD.json content."""
    from mks2.data.pretokenize import pretokenize

    started = time.perf_counter()
    root.mkdir(parents=True)
    steps = tqdm(total=6, desc="demo: building", unit="step", disable=not progress)

    def step(msg: str) -> None:
        log.info("demo: %s", msg)
        steps.set_postfix_str(msg, refresh=False)
        steps.update(1)

    # 1. scenes and records
    train = corpus.training_scenes(_rng(sizes, "train-scenes"), sizes.n_train_images)
    heldout = corpus.heldout_scenes(_rng(sizes, "heldout-scenes"), sizes.n_heldout_images, train)
    raw = {
        "captions": corpus.caption_records(train, "train", _rng(sizes, "captions")),
        "captions_heldout": corpus.caption_records(heldout, "heldout", _rng(sizes, "captions-heldout")),
        "text_sft": corpus.text_sft_records(_rng(sizes, "text-sft"), sizes.n_text_sft),
        "mm_sft": corpus.mm_sft_records(train, "train", _rng(sizes, "mm-sft"), sizes.n_mm_sft),
        "text_pretrain": corpus.text_pretrain_records(_rng(sizes, "text-pretrain"), sizes.n_text_pretrain),
    }
    for name, records in raw.items():
        _write_jsonl(root / "raw" / f"{name}.jsonl", records)
    evals = corpus.eval_sets(_rng(sizes, "eval"))
    for name, records in evals.items():
        _write_jsonl(root / "eval" / f"{name}.jsonl", records)
    step("records written")

    # 2. images
    images = root / "images"
    for split, scenes in (("train", train), ("heldout", heldout)):
        (images / split).mkdir(parents=True)
        for i, scene in enumerate(tqdm(scenes, desc=f"demo: rendering {split}", disable=not progress, leave=False)):
            save_png(render(scene), images / corpus.image_path(split, i))
    step("images rendered")

    # 3. tokenizer
    tok_dir = root / "tokenizer"
    train_tokenizer(_tokenizer_sentences(raw), tok_dir)
    step("tokenizer trained")

    # 4. vision tower
    tower, tower_metrics = pretrain_tower(progress=progress)
    save_tower(tower, tower_metrics, root / "vision")
    step("vision tower pre-trained")

    # 5. shards
    jobs = [("captions", "caption", None), ("captions_heldout", "caption", None), ("text_pretrain", "text", None)]
    jobs += [(f"{n}-{t}", k, t) for n, k in (("text_sft", "alpaca"), ("mm_sft", "llava")) for t in CHAT_TEMPLATES]
    manifests = {}
    for out_name, kind, template in jobs:
        src = out_name.split("-")[0] if template else out_name
        manifests[out_name] = pretokenize(
            [str(root / "raw" / f"{src}.jsonl")],
            fmt=kind,
            tokenizer=str(tok_dir),
            output=str(root / "shards" / out_name),
            image_root=str(images) if kind in ("caption", "llava") else None,
            chat_template=template or "llama2",
            max_tokens=MAX_RECORD_TOKENS,  # a longer record is a generator bug: fail the build
            progress=False,
            command=["python", "-m", "mks2.demo", f"(shards/{out_name})"],
        )
    step("shards pretokenized")

    world = {
        "seed": WORLD_SEED,
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "objects": [asdict(o) for o in OBJECTS],
    }
    _write_json_atomic(root / "world.json", world)
    info = {
        "version": DEMO_VERSION,
        "fingerprint": fingerprint(),
        "sizes": asdict(sizes),
        "records": {k: len(v) for k, v in raw.items()} | {f"eval/{k}": len(v) for k, v in evals.items()},
        "tokens": {k: m["counts"]["tokens"] for k, m in manifests.items()},
        "max_record_tokens": {k: _max_record_tokens(root / "shards" / k) for k in manifests},
        "vocab_size": next(iter(manifests.values()))["vocab_size"],
        "vision_tower": tower_metrics,
    }
    _write_json_atomic(root / MARKER, info)  # last: marks the build complete
    step("done")
    steps.close()
    print(f"demo: built {root} in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return info
