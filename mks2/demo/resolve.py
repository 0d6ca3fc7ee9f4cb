"""Turn ``demo:NAME`` / ``demo`` placeholders of a run config into real paths, building on first use."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

from mks2.config import RunConfig
from mks2.demo.builder import CHAT_TEMPLATES, DEFAULT_WORLD, check_world, ensure_built

log = logging.getLogger("mks2.demo")

PREFIX = "demo:"
# name -> path inside the build root; {template} is the run's chat template (instruction data).
DATASETS = {
    "captions": "shards/captions",
    "captions_heldout": "shards/captions_heldout",
    "text_pretrain": "shards/text_pretrain",
    "text_sft": "shards/text_sft-{template}",
    "mm_sft": "shards/mm_sft-{template}",
    "sft_heldout": "shards/sft_heldout-{template}",
    "mm_sft_heldout": "shards/mm_sft_heldout-{template}",
    "captions_noimage": "shards/captions_noimage",
}
WORLD_ONLY = {"captions_noimage": "paper"}
"""Artefacts only one world builds: the paper world's captions-without-images control."""
FILES = {
    "eval_mc": "eval/mc_heldout.jsonl",
    "eval_mc_seen": "eval/mc_seen.jsonl",
    "eval_open": "eval/open_heldout.jsonl",
    "eval_open_seen": "eval/open_seen.jsonl",
    "eval_retrieval": "raw/captions_heldout.jsonl",
    "images": "images",
    "tokenizer": "tokenizer",
    "vision": "vision",
    "world": "world.json",
}
NAMES = tuple(DATASETS) + tuple(FILES)


def is_demo(value: str | None) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def demo_path(root: str | os.PathLike, name: str, *, chat_template: str = "llama2") -> str:
    """Path of demo artefact ``name`` (without the ``demo:`` prefix) inside a built demo root."""
    if chat_template not in CHAT_TEMPLATES:
        raise ValueError(f"demo data exists for chat templates {', '.join(CHAT_TEMPLATES)}, not {chat_template!r}")
    rel = DATASETS.get(name) or FILES.get(name)
    if rel is None:
        raise ValueError(f"unknown demo name 'demo:{name}' (known: {', '.join(PREFIX + n for n in NAMES)})")
    return str(Path(root) / rel.format(template=chat_template))


def check_in_world(name: str, world: str) -> None:
    """ValueError if ``name`` is an artefact that ``world`` does not build."""
    only = WORLD_ONLY.get(name)
    if only is not None and only != world:
        raise ValueError(
            f"demo:{name} exists only in the {only!r} demo world (data.demo_world={only}), not in {world!r}"
        )


def resolve_path(
    spec: str,
    cache_dir: str | os.PathLike,
    *,
    chat_template: str = "llama2",
    progress: bool = True,
    world: str = DEFAULT_WORLD,
) -> str:
    """``demo:NAME`` -> real path in ``world``'s build (building it on first use); any other string is
    returned as is. For command-line tools that take dataset or file arguments."""
    if not is_demo(spec):
        return spec
    name = spec[len(PREFIX) :]
    demo_path(".", name, chat_template=chat_template)  # validate the name before building
    check_in_world(name, check_world(world))
    root, _ = ensure_built(cache_dir, progress=progress, world=world)
    return demo_path(root, name, chat_template=chat_template)


def resolve(cfg: RunConfig, *, progress: bool = True) -> RunConfig:
    """Return a copy of ``cfg`` with every demo placeholder replaced by a real path under
    ``data.cache_dir``: ``demo:NAME`` in ``data.datasets`` / ``data.eval_datasets``,
    ``data.tokenizer: demo``, ``model.vision.path: demo`` and, when a demo dataset is used and
    ``data.image_root`` is unset, the demo image directory. Builds the demo world on first use (under
    a lock: concurrent ranks build once); ``data.demo_world`` picks the world. A config without placeholders
    is returned unchanged.

    Demo evaluation sets are kept only while the training data is the demo's: with your own
    ``data.datasets`` the demo config's ``data.eval_datasets`` are dropped (with a note), not evaluated."""
    cfg = drop_demo_eval_sets(cfg)
    d, v = cfg.data, cfg.model.vision
    sources = list(d.datasets) + list(d.eval_datasets)
    uses_data = any(is_demo(s.path) for s in sources)
    if not (uses_data or d.tokenizer in ("demo", "demo:tokenizer") or v.path in ("demo", "demo:vision")):
        return cfg
    template = d.chat_template.value if hasattr(d.chat_template, "value") else str(d.chat_template)
    bad = [s.path for s in sources if is_demo(s.path) and s.path[len(PREFIX) :] not in NAMES]
    if bad:
        raise ValueError(
            f"data.datasets / data.eval_datasets: unknown demo name(s) {', '.join(bad)} "
            f"(known: {', '.join(PREFIX + n for n in NAMES)})"
        )
    world = check_world(d.demo_world)
    for s in sources:
        if is_demo(s.path):
            check_in_world(s.path[len(PREFIX) :], world)
    root, _ = ensure_built(d.cache_dir, progress=progress, world=world)
    out = copy.deepcopy(cfg)
    for src in list(out.data.datasets) + list(out.data.eval_datasets):
        if is_demo(src.path):
            src.path = demo_path(root, src.path[len(PREFIX) :], chat_template=template)
    if out.data.tokenizer in ("demo", "demo:tokenizer"):
        out.data.tokenizer = demo_path(root, "tokenizer")
    if out.model.vision.path in ("demo", "demo:vision"):
        out.model.vision.path = demo_path(root, "vision")
    if uses_data and not out.data.image_root:
        out.data.image_root = demo_path(root, "images")
    return out


def drop_demo_eval_sets(cfg: RunConfig) -> RunConfig:
    """``cfg`` without its ``demo:`` eval datasets when none of its training datasets is a demo one (a copy;
    ``cfg`` itself when nothing is dropped)."""
    demo_eval = [s.path for s in cfg.data.eval_datasets if is_demo(s.path)]
    if not demo_eval or not cfg.data.datasets or any(is_demo(s.path) for s in cfg.data.datasets):
        return cfg
    out = copy.deepcopy(cfg)
    out.data.eval_datasets = [s for s in out.data.eval_datasets if not is_demo(s.path)]
    log.info(
        "data.eval_datasets: dropped the demo's %s (data.datasets holds your own data; set data.eval_datasets "
        "to held-out sets of it to evaluate)", ", ".join(demo_eval),
    )  # fmt: skip
    return out
