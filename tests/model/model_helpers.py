"""Shared builders for the model-core tests (tiny shapes: every model here has < 100K parameters)."""

from __future__ import annotations

from pathlib import Path

import torch

from mks2 import build_model, load_config
from mks2.model import MKS2ForCausalLM
from tests.fixtures import make_tiny_llama

VOCAB = 128  # make_tiny_llama's vocabulary


def run_config(llama_dir: Path | str | None, *overrides: str, vision_dir: Path | str | None = None):
    """A validated RunConfig for the tiny models (vision: a tiny CLIP when given, else none)."""
    ov = ["model.stage=base", "data.seq_len=64", "model.lora.dropout=0.0"]
    if llama_dir is not None:
        ov.append(f"model.init_from={llama_dir}")
    if vision_dir is not None:
        ov += ["model.vision.kind=clip", f"model.vision.path={vision_dir}"]
    else:
        ov.append("model.vision.kind=none")
    return load_config(None, [*ov, *overrides])


def build(llama_dir, *overrides: str, vision_dir=None, **kwargs) -> MKS2ForCausalLM:
    model = build_model(run_config(llama_dir, *overrides, vision_dir=vision_dir), **kwargs)
    return model.eval()


def tiny_llama(directory: Path, **overrides):
    return make_tiny_llama(directory, **overrides)


def random_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


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
