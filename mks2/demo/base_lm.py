"""The demo's stand-in for a pretrained Llama: a tiny base LM pretrained on the demo world's plain text.

MKS2 starts from a pretrained LLM whose embeddings, attention and head stay frozen in both stages. The
demo config's random initialisation cannot play that part: a frozen random head on a final RMSNorm output
caps every logit near ``0.02 * hidden_size`` (about 1.3 for the demo), so no frozen-random-base model can
put much probability on any token. This module pretrains the demo architecture (stage ``base``, every LLM
parameter trainable) on ``demo:text_pretrain`` -- captions without looks, the looks of *training* objects
only, "X is an object" facts: the demo's no-leak rule holds, so held-out looks stay image-only -- and
writes it as a transformers Llama directory (``mks2.export``), which stage 1, stage 2 and the INST-LoRA
baseline then all use as ``model.init_from``, exactly like a real Llama-2 directory.

A plain single-process loop (seconds to a minute on a CPU), like the demo's vision-tower pretraining:
it builds a demo artefact, it is not the training system (that is ``mks2.training.loop``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mks2.config import RunConfig, load_config
from mks2.data import build_dataloader
from mks2.demo.resolve import resolve
from mks2.export.convert import export_model
from mks2.model import build_model
from mks2.training.schedule import lr_at

BASE_OVERRIDES = (
    "model.stage=base",
    "model.vision.kind=none",
    "model.vision.path=null",
    "data.datasets=[demo:text_pretrain]",
    "data.eval_datasets=[]",
    "data.packing=true",
    "data.seq_len=128",
    "data.num_workers=0",
)


def base_config(overrides: Sequence[str] = ()) -> RunConfig:
    """The demo architecture (configs/demo.yaml) as a text-only base LM on ``demo:text_pretrain``."""
    return resolve(load_config(None, [*BASE_OVERRIDES, *overrides]), progress=False)


def save_hf_llama(model: torch.nn.Module, cfg: RunConfig, out_dir: str | Path) -> Path:
    """Write a stage-``base`` model as a plain transformers Llama directory (weights, config.json, the
    tokenizer), through the exporter (``mks2.export``: atomic, verified against transformers)."""
    return Path(export_model(model, cfg, out_dir, force=True, progress=False).directory)


def pretrain_demo_base(
    out_dir: str | Path,
    *,
    steps: int = 400,
    batch_size: int = 16,
    lr: float = 3e-3,
    min_lr: float = 3e-4,
    warmup_steps: int = 20,
    seed: int = 0,
    overrides: Sequence[str] = (),
    progress: bool = True,
) -> dict:
    """Pretrain the demo base LM and save it to ``out_dir`` (an HF Llama directory). Returns a summary
    (first and last losses, steps, tokens)."""
    cfg = base_config([f"train.seed={seed}", f"train.micro_batch_size={batch_size}", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    loader = build_dataloader(cfg, rank=0, world_size=1, batch_size=batch_size)
    losses: list[float] = []
    tokens = 0
    batches = iter(loader)
    bar = tqdm(range(steps), desc="demo base LM", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, max_steps=steps)
        batch = next(batches)
        out = model(
            input_ids=batch["input_ids"],
            position_ids=batch["position_ids"],
            segment_ids=batch["segment_ids"],
            labels=batch["labels"],
        )
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if not math.isfinite(out.loss.item()):
            raise RuntimeError(f"demo base LM: non-finite loss at step {step + 1}")
        losses.append(out.loss.item())
        tokens += int((batch["segment_ids"] != 0).sum())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    save_hf_llama(model, cfg, out_dir)
    tail = losses[-max(1, min(20, steps // 4)) :]  # mean of the last steps (a quarter, at most 20)
    return {"steps": steps, "tokens": tokens, "loss_first": losses[0], "loss_last": sum(tail) / len(tail)}
