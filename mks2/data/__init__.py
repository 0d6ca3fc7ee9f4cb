"""Data pipeline: pretokenized Arrow shards, a resumable distributed loader, packing and collation.

- ``mks2.data.pretokenize.pretokenize`` (CLI ``tools/pretokenize.py``): raw JSONL/Parquet/CSV records
  -> Arrow stream shards + ``manifest.json``.
- ``mks2.data.tokenizer.load_tokenizer``: sentencepiece model or HF tokenizer directory.
- ``mks2.data.dataset.PretokenizedDataset``: memory-mapped random access with manifest checks.
- ``mks2.data.sampler``: deterministic, resumable, DP-size-independent sample stream, mixing and packing.
- ``mks2.data.collate.Collator``: the batch contract (image prefix expansion, labels, retrieval view).
- ``mks2.data.loader.build_dataloader``: what the trainer calls.

Names are imported lazily so that pretokenize workers do not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_tokenizer": "mks2.data.tokenizer",
    "pretokenize": "mks2.data.pretokenize",
    "PretokenizedDataset": "mks2.data.dataset",
    "Collator": "mks2.data.collate",
    "build_dataloader": "mks2.data.loader",
    "DataError": "mks2.data.errors",
    "DatasetError": "mks2.data.errors",
    "PretokenizeError": "mks2.data.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'mks2.data' has no attribute {name!r}")
