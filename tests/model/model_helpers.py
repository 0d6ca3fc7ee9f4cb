"""Shared builders for the model-core tests (tiny shapes: every model here has < 100K parameters)."""

from __future__ import annotations

from pathlib import Path

import torch

from mks2 import build_model
from mks2.config import RunConfig
from mks2.model import MKS2ForCausalLM
from tests import tiny
from tests.fixtures import make_tiny_llama
from tests.tiny import VOCAB, random_ids

__all__ = ["VOCAB", "build", "random_ids", "randomize_lora_", "run_config", "tiny_llama"]


def run_config(llama_dir: Path | str | None, *overrides: str, vision_dir: Path | str | None = None) -> RunConfig:
    """tests.tiny.run_config of a base-stage model whose shape is read from ``llama_dir`` (without one: the
    schema's default shape, for tests that set it or read it from an HF config)."""
    return tiny.run_config("model.stage=base", *overrides, llama_dir=llama_dir, vision_dir=vision_dir, tiny_shape=False)


def build(llama_dir, *overrides: str, vision_dir=None, **kwargs) -> MKS2ForCausalLM:
    model = build_model(run_config(llama_dir, *overrides, vision_dir=vision_dir), **kwargs)
    return model.eval()


def tiny_llama(directory: Path, **overrides):
    return make_tiny_llama(directory, **overrides)


@torch.no_grad()
def randomize_lora_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> int:
    """Give every LoRA B (and A) random values so adapters change the output. Returns how many."""
    gen = torch.Generator().manual_seed(seed)
    n = 0
    for name, p in model.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * std)
            n += 1
    return n
