"""What rank 0 tells the operator at start: the data the run will see (from the datasets' manifests, no
shard is read), the global batch, the schedule changes of a resume, whether there is anything left to
train, and -- once a few steps have run -- the estimated time to the end.

The numbers of passes are estimates: the sampler draws dataset ``d`` with probability
``weight_d / sum(weights)`` per sample, and with ``data.packing`` a row holds about
``seq_len // mean sample length`` samples (next-fit packing; image prefixes are not counted).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mks2 import checkpoint as ckpt
from mks2.config import RunConfig
from mks2.data.dataset import read_manifest
from mks2.training import distributed

log = logging.getLogger("mks2.training")

# train.* keys that shape the learning-rate schedule (mks2.training.schedule): a resume that changes one
# continues on a different curve than the checkpoint's.
SCHEDULE_KEYS = ("max_steps", "warmup_steps", "lr", "min_lr")


@dataclass
class DatasetFigures:
    """One training dataset as the summary reports it."""

    path: str
    samples: int
    tokens: int
    weight: float
    share: float  # weight / sum of weights: the fraction of drawn samples that come from it
    passes: float  # epochs over it that train.max_steps makes (estimate)


def samples_per_row(cfg: RunConfig, mean_tokens: float) -> float:
    """Samples in one training row: 1 without packing, else about ``seq_len // mean length`` (>= 1)."""
    if not cfg.data.packing or mean_tokens <= 0:
        return 1.0
    return max(1.0, float(cfg.data.seq_len // max(1, round(mean_tokens))))


def dataset_figures(cfg: RunConfig, manifests: list[dict[str, Any]]) -> tuple[list[DatasetFigures], float]:
    """Per dataset of ``cfg.data.datasets`` (``manifests`` in the same order): figures and passes; and the
    estimated samples per training row."""
    # the shards' rows / tokens are the source of truth; counts repeats them (older manifests may lack it)
    samples = [sum(int(s.get("rows", 0)) for s in m["shards"]) for m in manifests]
    tokens = [sum(int(s.get("tokens", 0)) for s in m["shards"]) for m in manifests]
    weights = [float(src.weight) for src in cfg.data.datasets]
    total_weight = sum(weights) or 1.0
    shares = [w / total_weight for w in weights]
    mean_tokens = sum(share * t / max(n, 1) for share, t, n in zip(shares, tokens, samples))
    per_row = samples_per_row(cfg, mean_tokens)
    drawn = cfg.train.max_steps * cfg.train.global_batch_size * per_row  # samples over the whole run
    figures = [
        DatasetFigures(str(src.path), n, t, w, share, drawn * share / max(n, 1))
        for src, n, t, w, share in zip(cfg.data.datasets, samples, tokens, weights, shares)
    ]
    return figures, per_row


def data_summary(cfg: RunConfig, manifests: list[dict[str, Any]]) -> str:
    """The start-of-run table of the training data and the global batch."""
    figures, per_row = dataset_figures(cfg, manifests)
    t = cfg.train
    mean_tokens = sum(f.share * f.tokens / max(f.samples, 1) for f in figures)
    lines = [f"training data ({t.max_steps} steps of {t.global_batch_size} rows):"]
    for f in figures:
        lines.append(
            f"  {f.path}: {f.samples:,} samples, {f.tokens:,} tokens, weight {f.weight:g} "
            f"({f.share:.0%} of samples), ~{f.passes:.2f} passes"
        )
    packed = f", ~{per_row:g} samples per packed row" if cfg.data.packing else ""
    batch_tokens = t.global_batch_size * per_row * mean_tokens
    lines.append(
        f"  global batch: {t.global_batch_size} rows = ~{t.global_batch_size * per_row:g} samples, "
        f"~{batch_tokens:,.0f} text tokens (image prefixes not counted; at most "
        f"{t.global_batch_size * cfg.data.seq_len:,} positions){packed}"
    )
    many = [f for f in figures if f.passes > 3]
    if many:
        lines.append(
            "  note: "
            + ", ".join(f"{f.path} is seen ~{f.passes:.0f} times" for f in many)
            + "; lower train.max_steps or add data if that is not intended"
        )
    return "\n".join(lines)


def log_data_summary(cfg: RunConfig) -> None:
    """Rank 0: print :func:`data_summary` (the manifests were checked by the preflight)."""
    if not cfg.data.datasets:
        return
    manifests = [read_manifest(src.path) for src in cfg.data.datasets]
    log.info("%s", data_summary(cfg, manifests))


def schedule_changes(saved_config: dict[str, Any], cfg: RunConfig) -> list[str]:
    """``train.KEY: checkpoint OLD, now NEW`` for each schedule key a resume changes."""
    saved = saved_config.get("train", {})
    changes = []
    for key in SCHEDULE_KEYS:
        old, new = saved.get(key), getattr(cfg.train, key)
        if old is not None and old != new:
            changes.append(f"train.{key}: checkpoint {old}, now {new}")
    return changes


def completion_message(save_dir: str, tag: str, step: int, max_steps: int) -> str:
    return (
        f"nothing to train: {save_dir}/{tag} is at step {step} and train.max_steps={max_steps}, so this run is "
        "complete. To continue it raise train.max_steps (e.g. train.max_steps="
        f"{step + max(step // 2, 1)}); to train again from scratch set train.resume=none (overwrites its "
        "checkpoints) or choose a new train.save_dir."
    )


def check_resume_target(cfg: RunConfig, tag: str | None) -> bool:
    """Rank 0 reads the checkpoint ``tag`` will resume: warns about schedule changes and decides whether
    the run is already complete (then says how to continue). Every rank gets the answer: True means
    there is nothing to train."""
    answer = [False]
    if tag is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        trainer_state, saved_config = ckpt.read_meta(Path(cfg.train.save_dir) / tag)
        step = int(trainer_state["loop"]["step"])
        if step >= cfg.train.max_steps:
            log.info("%s", completion_message(cfg.train.save_dir, tag, step, cfg.train.max_steps))
            answer[0] = True
        else:
            changes = schedule_changes(saved_config, cfg)
            if changes:
                log.warning(
                    "resuming %s with a different learning-rate schedule (the rest of the run follows the new "
                    "one):\n  - %s", tag, "\n  - ".join(changes),
                )  # fmt: skip
    distributed.broadcast_object_list(answer, src=0)
    return bool(answer[0])


def time_estimate(step_times: list[float], steps_left: int) -> str:
    """``~M min S s left`` from the mean of the first steps' times (the very first one, which compiles
    and warms caches, left out when there are others)."""
    times = step_times[1:] if len(step_times) > 1 else step_times
    seconds = steps_left * sum(times) / max(len(times), 1)
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    text = f"{hours} h {minutes} min" if hours else f"{minutes} min {secs} s"
    return f"estimated time left: ~{text} for {steps_left} steps (from the first {len(step_times)} steps)"
