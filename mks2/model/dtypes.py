"""The one map between the config's precision names (``model.dtype``, ``train.precision``) and torch dtypes."""

from __future__ import annotations

import torch

from mks2.config.schema import Precision

PRECISION_DTYPES: dict[Precision, torch.dtype] = {
    Precision.FP32: torch.float32,
    Precision.BF16: torch.bfloat16,
    Precision.FP16: torch.float16,
}


def torch_dtype(precision: Precision | str) -> torch.dtype:
    """``model.dtype`` / ``train.precision`` value (enum or its string) -> torch dtype."""
    return PRECISION_DTYPES[Precision(getattr(precision, "value", precision))]


def precision_of(dtype: torch.dtype) -> Precision | None:
    """The reverse map: torch dtype -> precision, or None for a dtype the config has no name for."""
    for precision, candidate in PRECISION_DTYPES.items():
        if candidate == dtype:
            return precision
    return None
