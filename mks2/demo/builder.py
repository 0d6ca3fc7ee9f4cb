"""Build the demo world into a cache directory: images, raw JSONL, evaluation sets, tokenizer, vision
tower and pretokenized shards. Deterministic (fixed seeds, single-threaded trainers, no timestamps in
our files) and safe under concurrency (an exclusive file lock; others wait, then reuse; a build in use is
held shared, so pruning never deletes it under a running job).

Layout of ``<cache_dir>/demo-v<VERSION>-<fingerprint>/`` (``no_leak`` world) or
``<cache_dir>/demo-v<VERSION>-paper-<fingerprint>/`` (``paper`` world; see ``world.WORLDS``); the fingerprint
hashes the generator's and the pretokenizer's source and the world, so a changed generator builds a fresh
directory::

    images/train/NNNNNN.png, images/heldout/NNNNNN.png    96x96 scenes (image root of every shard)
    images/blank.png                                      paper world: the captions-without-images control
    raw/{captions,captions_heldout,text_sft,mm_sft,text_pretrain,sft_heldout,mm_sft_heldout}.jsonl
    raw/captions_noimage.jsonl                            paper world only
    eval/{mc_heldout,mc_seen,open_heldout,open_seen}.jsonl
    tokenizer/tokenizer.model (+ tokenizer_config.json: loads with AutoTokenizer too)
    vision/ (transformers CLIPVisionModel: config.json, model.safetensors, preprocessor_config.json)
    shards/{captions,captions_heldout,text_pretrain}/, shards/{text_sft,mm_sft,sft_heldout,mm_sft_heldout}-<template>/
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
from mks2.demo.leaks import check_no_leak, checked_datasets
from mks2.demo.render import render, save_png
from mks2.demo.tokenizer import chat_lines, train_tokenizer
from mks2.demo.vision import TowerRecipe, pretrain_tower, save_tower
from mks2.demo.world import COLOURS, FACTS, OBJECTS, POSITIONS, SHAPES, SIZES, WORLD_SEED, WORLDS, Scene
from mks2.fileio import atomic_write_text

log = logging.getLogger("mks2.demo")

DEMO_VERSION = "2"
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
    n_sft_heldout: int = 200
    """Stage-2 held-out text instructions (no record repeats a training one): ``data.eval_datasets``."""
    n_mm_sft_heldout: int = 100
    """Stage-2 held-out multimodal instructions, about the held-out gallery's images (never trained on)."""
    tower_steps: int | None = None
    """Vision-tower pre-training steps (None: the recipe's 400); tests build tiny worlds with fewer."""
    tower_images: int | None = None
    """Vision-tower pre-training scenes (None: the recipe's 3000; its held-out check uses a sixth as many)."""


SIZES_DEFAULT = DemoSizes()
DEFAULT_WORLD = "no_leak"


def check_world(world: str) -> str:
    if world not in WORLDS:
        raise ValueError(f"unknown demo world {world!r} (known: {', '.join(WORLDS)})")
    return world


# Demo modules that use a build but do not shape it: editing them must not force a rebuild.
_NOT_BUILD_INPUTS = frozenset({"base_lm.py", "__main__.py"})


def fingerprint(world: str = DEFAULT_WORLD) -> str:
    """Short hash of the demo generator and pretokenizer sources (+ DEMO_VERSION and the world)."""
    h = hashlib.sha256(f"mks2-demo-{DEMO_VERSION}\n".encode())
    if check_world(world) != DEFAULT_WORLD:
        h.update(f"world {world}\n".encode())
    here = Path(__file__).resolve().parent
    data = here.parent / "data"
    own = [f for f in sorted(here.glob("*.py")) if f.name not in _NOT_BUILD_INPUTS]
    files = own + [data / n for n in _DATA_SOURCES if (data / n).is_file()]
    for f in files:
        h.update(f"{f.parent.name}/{f.name}\n".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def build_dir_name(world: str = DEFAULT_WORLD) -> str:
    tag = "" if check_world(world) == DEFAULT_WORLD else f"{world}-"
    return f"demo-v{DEMO_VERSION}-{tag}{fingerprint(world)}"


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


def ensure_built(
    cache_dir: str | os.PathLike, *, progress: bool = True, world: str = DEFAULT_WORLD
) -> tuple[Path, bool]:
    """Return (demo root, whether this call built it). Builds ``world`` under ``cache_dir`` on first use; a
    concurrent caller waits on the lock and then reuses the finished build."""
    cache = Path(cache_dir).expanduser().resolve()
    root = cache / build_dir_name(world)
    lock = cache / f".{root.name}.lock"
    _hold_in_use(lock)
    if is_complete(root):
        return root, False
    _release_in_use(lock)  # our own shared lock would block our exclusive one (flock: per open file)
    with exclusive_lock(lock):
        built = not is_complete(root)  # else built by whoever held the lock before us
        if built:
            if root.exists():
                log.warning("demo: removing interrupted build %s", root)
                shutil.rmtree(root)
            build(root, progress=progress, world=world)
    _hold_in_use(lock)
    if built:
        prune_old_builds(cache, keep=KEEP_BUILDS, current=root)
    return root, built


_IN_USE: dict[Path, int] = {}
"""Lock file -> the descriptor of this process's shared ``flock`` on it, held until the process exits: a
build in use (a training run, an experiment between its stages) is never pruned by a build of another
source version (``prune_old_builds`` skips a build whose lock it cannot take exclusively)."""


def _hold_in_use(lock: Path) -> None:
    """Take (once per process) a shared lock on ``lock``, waiting while a builder holds it exclusively."""
    if lock not in _IN_USE:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _IN_USE[lock] = fd


def _release_in_use(lock: Path) -> None:
    fd = _IN_USE.pop(lock, None)
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


KEEP_BUILDS = 4
"""Complete demo builds kept in a cache directory, both worlds together (the newest, by when they were
finished; the one just built always stays): builds of other source versions are useful to other checkouts
for a while, not forever."""


def prune_old_builds(cache: Path, *, keep: int, current: Path) -> list[Path]:
    """Delete the complete ``demo-v*`` builds in ``cache`` beyond the ``keep`` newest (``current`` is never
    deleted, nor a build whose lock another process holds: one being rebuilt, or in use by a running job,
    which holds it shared from ``ensure_built`` on). Returns the deleted ones."""
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
    """Training text of the tokenizer: every training record (never evaluation text, so neither the
    held-out instruction sets), the chat templates around the instruction data, and every printable
    ASCII character."""
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


def generate_records(sizes: DemoSizes, world: str) -> tuple[list[Scene], list[Scene], dict, dict]:
    """(training scenes, held-out gallery scenes, raw datasets, evaluation sets) of ``world``; pure."""
    train = corpus.training_scenes(_rng(sizes, "train-scenes"), sizes.n_train_images)
    heldout = corpus.heldout_scenes(_rng(sizes, "heldout-scenes"), sizes.n_heldout_images, train)
    text_sft = corpus.text_sft_records(_rng(sizes, "text-sft"), sizes.n_text_sft, world)
    raw = {
        "captions": corpus.caption_records(train, "train", _rng(sizes, "captions"), world, name_only=True),
        "captions_heldout": corpus.caption_records(heldout, "heldout", _rng(sizes, "captions-heldout"), world),
        "text_sft": text_sft,
        "mm_sft": corpus.mm_sft_records(train, "train", _rng(sizes, "mm-sft"), sizes.n_mm_sft, world),
        "text_pretrain": corpus.text_pretrain_records(_rng(sizes, "text-pretrain"), sizes.n_text_pretrain, world),
        "sft_heldout": corpus.text_sft_records(
            _rng(sizes, "sft-heldout"), sizes.n_sft_heldout, world, prefix="text-heldout", exclude=text_sft
        ),
        "mm_sft_heldout": corpus.mm_sft_records(
            heldout, "heldout", _rng(sizes, "mm-sft-heldout"), min(sizes.n_mm_sft_heldout, len(heldout)), world,
            prefix="mm-heldout",
        ),
    }  # fmt: skip
    if world == "paper":
        raw["captions_noimage"] = corpus.blank_caption_records(raw["captions"])
    return train, heldout, raw, corpus.eval_sets(_rng(sizes, "eval"))


# Which shards each raw dataset becomes: (pretokenizer format, one per chat template?)
_SHARD_KINDS = {
    "captions": ("caption", False),
    "captions_heldout": ("caption", False),
    "captions_noimage": ("caption", False),
    "text_pretrain": ("text", False),
    "text_sft": ("alpaca", True),
    "mm_sft": ("llava", True),
    "sft_heldout": ("alpaca", True),
    "mm_sft_heldout": ("llava", True),
}


def build(root: Path, sizes: DemoSizes = SIZES_DEFAULT, *, progress: bool = True, world: str = DEFAULT_WORLD) -> dict:
    """Generate everything of ``world`` into ``root`` (must not exist); returns the BUILD.json content.
    The no-leak check runs on the records before anything is written (a leak fails the build)."""
    from mks2.data.pretokenize import pretokenize

    check_world(world)
    started = time.perf_counter()
    # 1. scenes and records, checked before the directory exists: a leak leaves nothing behind
    train, heldout, raw, evals = generate_records(sizes, world)
    n_checked = check_no_leak(raw, world)
    root.mkdir(parents=True)
    steps = tqdm(total=6, desc=f"demo: building ({world})", unit="step", disable=not progress)

    def step(msg: str) -> None:
        log.info("demo: %s", msg)
        steps.set_postfix_str(msg, refresh=False)
        steps.update(1)

    for name, records in raw.items():
        _write_jsonl(root / "raw" / f"{name}.jsonl", records)
    for name, records in evals.items():
        _write_jsonl(root / "eval" / f"{name}.jsonl", records)
    step("records written")

    # 2. images
    images = root / "images"
    for split, scenes in (("train", train), ("heldout", heldout)):
        (images / split).mkdir(parents=True)
        for i, scene in enumerate(tqdm(scenes, desc=f"demo: rendering {split}", disable=not progress, leave=False)):
            save_png(render(scene), images / corpus.image_path(split, i))
    if "captions_noimage" in raw:  # one empty scene: a prefix that carries no visual information
        save_png(render(Scene(items=(), background=240, jitter=())), images / corpus.BLANK_IMAGE)
    step("images rendered")

    # 3. tokenizer
    tok_dir = root / "tokenizer"
    train_tokenizer(_tokenizer_sentences(raw), tok_dir)
    step("tokenizer trained")

    # 4. vision tower
    recipe = TowerRecipe()
    if sizes.tower_steps is not None or sizes.tower_images is not None:
        n = sizes.tower_images or recipe.n_images
        recipe = TowerRecipe(steps=sizes.tower_steps or recipe.steps, n_images=n, n_eval_images=max(n // 6, 64))
    tower, tower_metrics = pretrain_tower(recipe, progress=progress)
    save_tower(tower, tower_metrics, root / "vision")
    step("vision tower pre-trained")

    # 5. shards
    jobs = []
    for name in raw:
        kind, per_template = _SHARD_KINDS[name]
        jobs += [(f"{name}-{t}", name, kind, t) for t in CHAT_TEMPLATES] if per_template else [(name, name, kind, None)]
    manifests = {}
    for out_name, src, kind, template in jobs:
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

    world_info = {
        "world": world,
        "seed": WORLD_SEED,
        "colours": {k: list(v) for k, v in COLOURS.items()},
        "shapes": list(SHAPES),
        "sizes": list(SIZES),
        "positions": list(POSITIONS),
        "objects": [asdict(o) for o in OBJECTS],
        "facts": {n: asdict(f) for n, f in FACTS.items()},
    }
    _write_json_atomic(root / "world.json", world_info)
    info = {
        "version": DEMO_VERSION,
        "world": world,
        "fingerprint": fingerprint(world),
        "sizes": asdict(sizes),
        "records": {k: len(v) for k, v in raw.items()} | {f"eval/{k}": len(v) for k, v in evals.items()},
        "leak_check": {"records_checked": n_checked, "datasets": sorted(checked_datasets(list(raw), world))},
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
