"""Data shards verified once per node, before the engine is built.

Hashing every shard on every rank after the engine exists costs each node ``ranks_per_node`` passes over
the data on a shared filesystem, and a slow pass can outlast the collective timeout of the ranks waiting in
the first step. Here the node's local rank 0 opens every training and evaluation dataset with its checks
(sha256 of each shard, token ids below the vocabulary: ``mks2.data.dataset``) while the node's other ranks
wait on a gloo group with a timeout of its own; then every rank learns every node's verdict. If any node
found a problem every rank raises the same one-line DatasetError; otherwise each process marks the
datasets verified, and its loaders open them without hashing again.
"""

from __future__ import annotations

import logging

from mks2.config import RunConfig
from mks2.data.dataset import mark_verified
from mks2.data.errors import DatasetError
from mks2.data.loader import open_datasets
from mks2.training import distributed

log = logging.getLogger("mks2.training")


def verify_data_once_per_node(cfg: RunConfig) -> None:
    """See the module docstring. Every rank must call it (collective); a no-op with ``data.verify_hashes=false``."""
    if not cfg.data.verify_hashes:
        return
    splits = [(split, sources) for split, sources in (("train", cfg.data.datasets), ("eval", cfg.data.eval_datasets))
              if sources]  # fmt: skip
    problem: str | None = None
    if distributed.local_rank() == 0:
        for split, _ in splits:
            try:
                open_datasets(cfg, split, verify_hashes=True)  # opened, checked, dropped
            except (DatasetError, OSError) as exc:
                problem = f"rank {distributed.rank()}: {exc}"
                break
    group = distributed.host_group()
    verdicts = distributed.all_gather_object(problem, group=group)
    if group is not None:
        distributed.destroy_group(group)
    first = next((v for v in verdicts if v is not None), None)
    if first is not None:
        raise DatasetError(first)
    for _, sources in splits:
        for src in sources:
            mark_verified(src.path)
    if distributed.rank() == 0:
        log.info("data shards verified (sha256, token ids) once per node before the engine")
