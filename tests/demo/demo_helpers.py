"""Shared helpers of the demo tests: caption parsing, linear probes on the vision tower."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from mks2.demo.world import POSITIONS, SIZES

# Longest position phrases first: "at the top right" must not match as "at the top".
_ITEM = re.compile(r"a (small|large) ([a-z]+) (" + "|".join(sorted(POSITIONS, key=len, reverse=True)) + r")")


def parse_caption(caption: str) -> tuple[tuple[str, str, int], ...]:
    """Content key of a demo caption: sorted (name, size, cell) of every object it names."""
    return tuple(sorted((name, size, POSITIONS.index(pos)) for size, name, pos in _ITEM.findall(caption)))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def ridge(x: np.ndarray, y: np.ndarray, lam: float = 1.0) -> np.ndarray:
    """Closed-form ridge regression weights [F, T] (float64)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    return np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)


def softmax_probe_accuracy(
    x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor, n_classes: int
) -> float:
    """Multinomial logistic regression (full-batch LBFGS, deterministic) on standardised features.
    Runs on one thread: these tiny ops are ~30x slower with threads fighting over shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _probe(x_train, y_train, x_test, y_test, n_classes)
    finally:
        torch.set_num_threads(threads)


def _probe(x_train, y_train, x_test, y_test, n_classes: int) -> float:
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    xt, xe = (x_train - mu) / sd, (x_test - mu) / sd
    lin = torch.nn.Linear(xt.shape[1], n_classes).double()
    torch.nn.init.zeros_(lin.weight)
    torch.nn.init.zeros_(lin.bias)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(xt.double()), y_train) + 1e-3 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float((lin(xe.double()).argmax(-1) == y_test).float().mean())


def caption_features(keys, names: list[str]) -> np.ndarray:
    """Additive bag of (name, size) and (name, cell) indicators: what a linear text side could compute."""
    n = len(names)
    out = np.zeros((len(keys), n * len(SIZES) + n * 9), dtype=np.float64)
    for row, key in enumerate(keys):
        for name, size, cell in key:
            k = names.index(name)
            out[row, k * len(SIZES) + SIZES.index(size)] = 1.0
            out[row, n * len(SIZES) + k * 9 + cell] = 1.0
    return out
