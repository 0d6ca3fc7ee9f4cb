"""Output allocation of the fused backends, with an optional NaN poison for tests.

Every output buffer of the Triton and CUDA launchers comes from ``empty``. Under ``poisoned()`` the
buffers are filled with NaN (float) before the kernels run, so an element a kernel forgets to write
shows up as NaN in the result instead of passing by luck with a stale or zero value.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_POISON = False


def empty(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON:
        t.fill_(float("nan"))
    return t


@contextlib.contextmanager
def poisoned(enabled: bool = True) -> Iterator[None]:
    """Within the block, fused-backend outputs start as NaN (test helper)."""
    global _POISON
    prev, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = prev
