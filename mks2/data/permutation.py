"""Pseudo-random permutations of ``range(n)`` in O(1) memory (a Feistel network with cycle walking).

A dataset of hundreds of millions of samples would need gigabytes per rank for an explicit
``numpy.random.permutation`` per epoch; this bijection is evaluated on demand, vectorised over numpy
arrays, and is fully determined by ``(n, seed words)``. Construction: split a ``2h``-bit domain
(``4^h >= n``) into halves and apply 6 Feistel rounds whose round function is the splitmix64 mixer
keyed per round; values that land at or above ``n`` are re-encrypted until they fall inside
(cycle walking keeps it a bijection on ``[0, n)``; the domain is < 4n, so few steps are needed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_ROUNDS = 6


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def seed_words(*entropy: int, count: int = 1) -> np.ndarray:
    """``count`` uint64 words derived from integers (seed, stream id, epoch, ...)."""
    return np.random.SeedSequence([int(e) & 0xFFFFFFFFFFFFFFFF for e in entropy]).generate_state(count, np.uint64)


def uniform01(key: int, positions: np.ndarray) -> np.ndarray:
    """Deterministic uniforms in [0, 1), one per position, for a given uint64 key."""
    x = mix64(positions.astype(np.uint64) ^ np.uint64(key))
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class FeistelPermutation:
    """Bijection on ``[0, n)``; ``perm(positions)`` maps an int array of positions to indices."""

    def __init__(self, n: int, entropy: Sequence[int]):
        if n < 1:
            raise ValueError(f"cannot permute {n} elements")
        self.n = n
        bits = max(2, int(n - 1).bit_length())
        self._half = (bits + 1) // 2
        self._mask = np.uint64((1 << self._half) - 1)
        self._keys = seed_words(*entropy, count=_ROUNDS)

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        h = np.uint64(self._half)
        left, right = x >> h, x & self._mask
        for key in self._keys:
            left, right = right, left ^ (mix64(right ^ key) & self._mask)
        return (left << h) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        if self.n == 1:
            return np.zeros(x.shape, dtype=np.int64)
        x = self._encrypt(x)
        outside = x >= np.uint64(self.n)
        while outside.any():  # cycle walking: the permutation restricted to [0, n) is still a bijection
            x[outside] = self._encrypt(x[outside])
            outside = x >= np.uint64(self.n)
        return x.astype(np.int64)
