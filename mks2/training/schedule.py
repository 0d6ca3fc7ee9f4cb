"""Learning-rate schedule: linear warmup, then cosine decay to ``train.min_lr`` at ``train.max_steps``.

A pure function of the step (no hidden state besides the step counter the LambdaLR keeps), so a
restored scheduler reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import math

import torch


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the lr used by the first update is lr_at(0))."""
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR whose factor multiplies each group's initial lr (= train.lr) to give ``lr_at``."""
    base = float(train_cfg.lr)
    kwargs = dict(
        lr=base,
        min_lr=float(train_cfg.min_lr),
        warmup_steps=int(train_cfg.warmup_steps),
        max_steps=int(train_cfg.max_steps),
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, **kwargs) / base)
