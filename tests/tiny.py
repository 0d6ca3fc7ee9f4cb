"""The tests' tiny configurations, in one place: command-line overrides for the launchers (stage 1 and
stage 2 on the demo world) and the in-process RunConfig of a tiny model with no data.

One shape runs everywhere: hidden 32, 2 decoder layers, 4 query / 2 key-value heads (as in
``tests.fixtures.make_tiny_llama``), vocabulary 128 where no tokenizer sets it; a training step takes well
under a second on 2 shared cores."""

from __future__ import annotations

from pathlib import Path

import torch

from mks2.config import RunConfig, load_config

VOCAB = 128  # tests.fixtures.make_tiny_llama's vocabulary

# configs/demo.yaml (stage 1) shrunk to the tiny shape; runs set their own steps and saves.
TINY = [
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "train.micro_batch_size=4",
    "train.global_batch_size=8",
    "train.warmup_steps=2",
    "train.precision=fp32",
    "train.eval_interval=-1",
    "data.num_workers=0",
]

# The stage-1 run that stage 2 and the export continue from: a few steps, one checkpoint at the end.
STAGE1_ARGS = [*TINY, "train.max_steps=4", "train.save_interval=0"]

# Stage 2 on configs/demo_stage2.yaml: the architecture comes from the stage-1 run; one sample per
# micro-batch so that in most steps one rank's micro-batch holds an image while the other's holds none.
STAGE2_ARGS = [
    "train.micro_batch_size=1",
    "train.global_batch_size=4",
    "train.warmup_steps=2",
    "train.precision=fp32",
    "train.eval_interval=-1",
    "data.seq_len=96",
    "data.num_workers=0",
]

# A 20-step stage-1 run that checkpoints every 5 steps: what the resume tests interrupt and compare.
RESUME_ARGS = ["train.max_steps=20", "train.save_interval=5", "train.keep_last=5", "train.eval_interval=0"]

# Two pipeline stages on two ranks (data parallel 1).
PIPELINE = ["parallel.mode=pipeline", "parallel.pipeline_stages=2"]

# The tiny shape as model overrides, for a config that reads no HF checkpoint.
TINY_MODEL = [
    f"model.vocab_size={VOCAB}",
    "model.hidden_size=32",
    "model.intermediate_size=64",
    "model.num_layers=2",
    "model.num_heads=4",
    "model.num_kv_heads=2",
    "model.max_position_embeddings=128",
]


def run_config(
    *overrides: str,
    llama_dir: Path | str | None = None,
    vision_dir: Path | str | None = None,
    tiny_shape: bool = True,
) -> RunConfig:
    """A validated RunConfig of a tiny model for in-process tests (no data is read).

    The model's shape comes from the HF Llama checkpoint ``llama_dir`` when given, else from TINY_MODEL
    (``tiny_shape=False``: the schema's defaults, for tests that set the shape themselves or read it from
    an HF config). The vision tower is the tiny CLIP at ``vision_dir``, or none. ``overrides`` come last
    and win."""
    base = ["data.seq_len=64", "model.lora.dropout=0.0"]
    if llama_dir is not None:
        base.append(f"model.init_from={llama_dir}")
    elif tiny_shape:
        base += TINY_MODEL
    if vision_dir is not None:
        base += ["model.vision.kind=clip", f"model.vision.path={vision_dir}"]
    else:
        base.append("model.vision.kind=none")
    return load_config(None, [*base, *overrides])


def random_ids(batch: int, seq: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    """Token ids [batch, seq] in 3..vocab-1 (no pad / bos / eos), the same for the same seed."""
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))
