"""Shared builders for the export tests: tiny run configs and models with every weight random."""

from __future__ import annotations

from pathlib import Path

import torch

from mks2 import build_model
from mks2.config import RunConfig
from tests import tiny
from tests.tiny import VOCAB, random_ids

__all__ = ["VOCAB", "jitter_", "random_ids", "run_config", "tiny_model"]


def run_config(*overrides: str, llama_dir: Path | None = None, vision_dir: Path | None = None) -> RunConfig:
    """tests.tiny.run_config with what an export needs: no tokenizer, rank-4 LoRA, fp32 weights."""
    return tiny.run_config(
        "data.tokenizer=null", "model.lora.rank=4", "train.precision=fp32", *overrides,
        llama_dir=llama_dir, vision_dir=vision_dir,
    )  # fmt: skip


@torch.no_grad()
def jitter_(model: torch.nn.Module, *, std: float = 0.05, seed: int = 0, only: tuple[str, ...] = ()) -> None:
    """Random values for every parameter (or those whose name contains one of ``only``), so that
    LoRA B, routers, zero-initialised MVM down-projections all matter in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if not only or any(tag in name for tag in only):
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * std)


def tiny_model(cfg: RunConfig, *, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    jitter_(model, seed=seed)
    return model
