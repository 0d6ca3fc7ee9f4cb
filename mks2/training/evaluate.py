"""Held-out text-to-image retrieval for stage 1, run inside training (either parallel mode).

The gallery is every sample of ``data.eval_datasets`` (the demo: 100 held-out scenes). Each caption
(text only, no image) is encoded by the LLM + retrieval projection exactly as in training; each image
by the frozen vision encoder's pooled output; a caption is a hit when its own image is more similar
than every other image of the whole gallery (top-1; a tie is a miss; chance = 1 / gallery size).

The batches go through the same stage-1 step as training with ``task.collect`` set, so the loss
code path collects the embeddings instead of computing a loss: in zero3 mode through the engine's
forward (every rank processes the whole gallery, so all ranks run the same partitioned modules), in
pipeline mode through ``PipelineEngine.eval_batch`` (the last stage collects).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mks2.config import ParallelMode, Stage
from mks2.model.retrieval import recall_at_k


def eval_loader(trainer: Any) -> Any:
    """The eval split, identical on every rank (one ordered pass, rank 0 of a world of one)."""
    from mks2.data import build_dataloader
    from mks2.model.vision import load_image_processor, vision_prefix_length

    cfg = trainer.cfg
    return build_dataloader(
        cfg,
        rank=0,
        world_size=1,
        stage=Stage.MVM,
        image_processor=load_image_processor(cfg.model),
        num_prefix_tokens=vision_prefix_length(cfg.model),
        split="eval",
        num_workers=0,
    )


def retrieval_metrics(text: torch.Tensor, image: torch.Tensor) -> dict[str, float]:
    """text, image [N, E] L2-normalised, row i of each belongs together -> recall@1/@5 of text->image
    (``mks2.model.retrieval.recall_at_k``, the definition ``mks2.eval`` reports too: ties are misses)."""
    recall = recall_at_k(text, image, ks=(1, 5))
    n = text.shape[0]
    return {
        "eval_retrieval_top1": recall[1],
        "eval_retrieval_top5": recall[5],
        "eval_gallery": float(n),
        "eval_chance_top1": 1.0 / n,
    }


def retrieval_eval(trainer: Any) -> dict[str, float]:
    """Run the held-out retrieval evaluation on every rank together; returns the metrics on every rank."""
    te, task = trainer.te, trainer.task
    loader = eval_loader(trainer)
    n = len(loader.sampler.units) - loader.sampler.padded  # the real gallery, without wrap-around padding
    num_batches = len(loader)
    holds_data = te.mode == ParallelMode.ZERO3 or te.is_first_stage or te.is_last_stage
    task.collect = []
    try:
        if te.mode == ParallelMode.ZERO3:
            te.engine.eval()
            with torch.no_grad():
                for batch in loader:
                    te.engine(**task.prepare(batch, te.vision, te.device))
            te.engine.train()
        else:
            feed = (task.pipeline_tuples(task.prepare(b, te.vision, te.device)) for b in (loader if holds_data else ()))
            te.engine.eval_batch(iter(feed), compute_loss=True, bcast_loss=False, num_micro_batches=num_batches)
        collected = task.collect
    finally:
        task.collect = None
    out = torch.zeros(4, dtype=torch.float64, device=te.device)
    holder = te.mode == ParallelMode.ZERO3 or te.is_last_stage
    if holder and collected:
        text = torch.cat([t for t, _ in collected])[:n]
        image = torch.cat([i for _, i in collected])[:n]
        m = retrieval_metrics(text, image)
        out = torch.tensor(
            [m["eval_retrieval_top1"], m["eval_retrieval_top5"], m["eval_gallery"], m["eval_chance_top1"]],
            dtype=torch.float64,
            device=te.device,
        )
    if dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)  # every holder computed the same numbers
    keys = ("eval_retrieval_top1", "eval_retrieval_top5", "eval_gallery", "eval_chance_top1")
    return {k: out[i].item() for i, k in enumerate(keys)}
