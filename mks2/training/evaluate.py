"""Held-out evaluation inside training (either parallel mode): text-to-image retrieval for stage 1, mean
answer-token loss for stage 2.

Stage 1:

The gallery is every sample of ``data.eval_datasets`` (the demo: 100 held-out scenes). Each caption
(text only, no image) is encoded by the LLM + retrieval projection exactly as in training; each image
by the frozen vision encoder's pooled output; a caption is a hit when its own image is more similar
than every other image of the whole gallery (top-1; a tie is a miss; chance = 1 / gallery size).

The batches go through the same stage-1 step as training with ``task.collect`` set, so the loss
code path collects the embeddings instead of computing a loss: in zero3 mode through the engine's
forward (every rank processes the whole gallery, so all ranks run the same partitioned modules), in
pipeline mode through ``PipelineEngine.eval_batch`` (the last stage collects).

Stage 2: every sample of ``data.eval_datasets`` (instruction data, one sample a row, unpacked) goes through
the stage-2 step the same way; the loss code collects each row's answer-token loss sum and count. The
record gets ``eval_loss`` (mean over all answer tokens) and, per kind of dataset, ``eval_loss_text``
(datasets without images) and ``eval_loss_multimodal`` (with images), each the mean over its own tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mks2.config import ParallelMode, Stage
from mks2.model.retrieval import recall_at_k
from mks2.training import distributed


def eval_loader(trainer: Any, stage: Stage = Stage.MVM) -> Any:
    """The eval split, identical on every rank (one ordered pass, rank 0 of a world of one)."""
    from mks2.config import VisionKind
    from mks2.data import build_dataloader
    from mks2.model.vision import load_image_processor, vision_prefix_length

    cfg = trainer.cfg
    vision: dict[str, Any] = {}
    if VisionKind(cfg.model.vision.kind) != VisionKind.NONE:
        vision = {
            "image_processor": load_image_processor(cfg.model),
            "num_prefix_tokens": vision_prefix_length(cfg.model),
        }
    return build_dataloader(cfg, rank=0, world_size=1, stage=stage, split="eval", num_workers=0, **vision)


def collect_pass(trainer: Any, loader: Any) -> list[Any]:
    """Run every batch of ``loader`` through the training step with ``task.collect`` set (no gradients, no
    metrics); returns what the loss code collected on this rank (empty on pipeline stages without the loss)."""
    te, task = trainer.te, trainer.task
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
            te.engine.eval_batch(iter(feed), compute_loss=True, bcast_loss=False, num_micro_batches=len(loader))
        return task.collect
    finally:
        task.collect = None


def _agree(trainer: Any, values: list[float]) -> list[float]:
    """The loss holders' numbers on every rank (holders computed the same; others send -inf)."""
    te = trainer.te
    out = torch.tensor(values, dtype=torch.float64, device=te.device)
    distributed.all_reduce(out, op=distributed.ReduceOp.MAX)
    return out.tolist()


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
    te = trainer.te
    loader = eval_loader(trainer)
    n = len(loader.sampler.units) - loader.sampler.padded  # the real gallery, without wrap-around padding
    collected = collect_pass(trainer, loader)
    out = torch.zeros(4, dtype=torch.float64, device=te.device)
    holder = te.mode == ParallelMode.ZERO3 or te.is_last_stage
    if holder and collected:
        text = torch.cat([t for t, _ in collected])[:n]
        image = torch.cat([i for _, i in collected])[:n]
        real = image.abs().amax(dim=-1) > 0  # an undecodable image's embedding is zero: not in the gallery
        text, image = text[real], image[real]
        m = retrieval_metrics(text, image) if len(image) else dict.fromkeys(("eval_retrieval_top1",
                              "eval_retrieval_top5", "eval_gallery", "eval_chance_top1"), 0.0)  # fmt: skip
        out = torch.tensor(
            [m["eval_retrieval_top1"], m["eval_retrieval_top5"], m["eval_gallery"], m["eval_chance_top1"]],
            dtype=torch.float64,
            device=te.device,
        )
    distributed.all_reduce(out, op=distributed.ReduceOp.MAX)  # every holder computed the same numbers
    keys = ("eval_retrieval_top1", "eval_retrieval_top5", "eval_gallery", "eval_chance_top1")
    return {k: out[i].item() for i, k in enumerate(keys)}


SFT_KEYS = ("eval_loss", "eval_loss_text", "eval_loss_multimodal", "eval_answer_tokens")


def sft_loss_metrics(rows: torch.Tensor, with_images: list[bool]) -> dict[str, float]:
    """rows [N, 2] (answer-token loss sum, answer tokens) of the N eval samples, ``with_images[i]``: sample
    i comes from a dataset with images -> mean loss over all answer tokens and per kind present."""
    kinds = torch.tensor(with_images, dtype=torch.bool)
    out = {"eval_loss": (rows[:, 0].sum() / rows[:, 1].sum().clamp(min=1)).item()}
    for key, mask in (("eval_loss_text", ~kinds), ("eval_loss_multimodal", kinds)):
        if mask.any():
            out[key] = (rows[mask, 0].sum() / rows[mask, 1].sum().clamp(min=1)).item()
    out["eval_answer_tokens"] = rows[:, 1].sum().item()
    return out


def sft_eval(trainer: Any, has_images: list[bool]) -> dict[str, float]:
    """Stage 2's held-out answer-token loss on every rank together; returns the metrics on every rank.
    ``has_images[d]``: eval dataset d is of a kind with images."""
    te = trainer.te
    loader = eval_loader(trainer, Stage.MOME)
    units = loader.sampler.units[: len(loader.sampler.units) - loader.sampler.padded]  # ((dataset, index),)
    collected = collect_pass(trainer, loader)
    values = [-math.inf] * len(SFT_KEYS)  # -inf: "not computed here" (and "no such kind" after the MAX)
    if (te.mode == ParallelMode.ZERO3 or te.is_last_stage) and collected:
        rows = torch.cat([c.cpu() for c in collected])[: len(units)]  # [N, 2], padding rows dropped
        metrics = sft_loss_metrics(rows.double(), [has_images[unit[0][0]] for unit in units])
        values = [metrics.get(k, -math.inf) for k in SFT_KEYS]
    agreed = _agree(trainer, values)
    return {k: v for k, v in zip(SFT_KEYS, agreed) if v != -math.inf}
