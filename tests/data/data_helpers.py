"""Shared builders for the data tests: a tiny sentencepiece model trained in seconds, input writers,
and a run config pointing at pretokenized directories."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mks2.demo.tokenizer import train_sentencepiece as train_llama_sentencepiece

WORDS = (
    "the a red blue green yellow small large big tiny circle square triangle star left right top bottom "
    "of is on in and with image shows picture what where which color shape answer question user assistant"
).split()


def corpus_lines(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        lines.append(" ".join(words) + rng.choice([".", "?", "!", " 42.", " [INST] USER: ASSISTANT:"]))
    return lines


def train_sentencepiece(path: Path, *, vocab_size: int = 400, seed: int = 0) -> Path:
    """A Llama-style sentencepiece model (unk=0, bos=1, eos=2, no pad, byte fallback, identity
    normalisation) through the project's one recipe, ``mks2.demo.tokenizer.train_sentencepiece``."""
    path.write_bytes(train_llama_sentencepiece(corpus_lines(seed=seed), vocab_size=vocab_size, pad_id=-1))
    return path


def write_jsonl(path: Path, records: Sequence[Any], *, gz: bool = False) -> Path:
    data = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records).encode()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    return path


def caption_records(n: int, seed: int = 0, image_dir: str = "img") -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [
        {"image": f"{image_dir}/{i}.png", "caption": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))}
        for i in range(n)
    ]


def text_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))} for _ in range(n)]


def write_images(root: Path, n: int, image_dir: str = "img", size: int = 16) -> None:
    from PIL import Image

    (root / image_dir).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), ((37 * i) % 256, (91 * i) % 256, (13 * i) % 256)).save(
            root / image_dir / f"{i}.png"
        )


def run_config(datasets: Sequence[str | dict], *, tokenizer: str | None, **data: Any):
    """A validated RunConfig over pretokenized directories (tiny text model unless overridden)."""
    from mks2.config import config_from_dict

    cfg: dict[str, Any] = {
        "model": {
            "stage": "base",
            "vocab_size": 512,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_layers": 1,
            "num_heads": 2,
            "max_position_embeddings": 512,
        },
        "data": {
            "datasets": list(datasets),
            "tokenizer": tokenizer,
            "seq_len": 64,
            "packing": False,
            "num_workers": 0,
            **data,
        },
        "train": {"micro_batch_size": 4, "global_batch_size": 8, "seed": 7},
    }
    return config_from_dict(cfg)
