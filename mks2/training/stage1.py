"""Stage 1 (``model.stage=mvm``): visual information storage into the MVM experts (DESIGN §1).

One micro-batch runs the LLM ONCE on both views of its B captions, stacked along the batch dim:

    rows [0, B):   caption view   = image prefix + caption, labels on caption tokens
    rows [B, 2B):  retrieval view = caption alone (no image), padded to the same length

so every rank calls the same modules the same number of times (ZeRO-3), and the decoder weights
are gathered once per micro-batch instead of twice. The captioning loss reads the first B rows;
the retrieval loss takes the final-norm hidden state at ``ret_eos_index`` of the last B rows,
projects and normalises it, and contrasts it (symmetric InfoNCE, learnable temperature) with the
frozen, normalised pooled image embeddings of the WHOLE data-parallel batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mks2.config import RunConfig, Stage
from mks2.constants import IGNORE_INDEX
from mks2.model import causal_lm_loss
from mks2.training.losses import contrastive_loss
from mks2.training.pipeline import HeadPipe, PipelineSpec, build_pipeline_spec
from mks2.training.task import StageTask


def _pad_to(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """Right-pad dim 1 of [B, S] to ``length``."""
    return F.pad(x, (0, length - x.shape[1]), value=value) if x.shape[1] < length else x


def stack_views(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Caption view [B, S] and retrieval view [B, S_r] -> one [2B, max(S, S_r)] batch (padding:
    token 0, position 0, segment 0; labels only for the caption rows, [B, max(S, S_r)])."""
    s = max(batch["input_ids"].shape[1], batch["ret_input_ids"].shape[1])
    ids = torch.cat([_pad_to(batch["input_ids"], s, 0), _pad_to(batch["ret_input_ids"], s, 0)])
    pos = torch.cat([_pad_to(batch["position_ids"], s, 0), _pad_to(batch["ret_position_ids"], s, 0)])
    seg = torch.cat([_pad_to(batch["segment_ids"].long(), s, 0), _pad_to(batch["ret_segment_ids"].long(), s, 0)])
    labels = _pad_to(batch["labels"], s, IGNORE_INDEX)
    return {"input_ids": ids, "position_ids": pos, "segment_ids": seg, "labels": labels}


def stage1_loss(
    task: Stage1Task,
    *,
    logits: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Weighted caption + retrieval loss of one micro-batch; records the metrics in ``task.sink``.

    logits [B, S, V] and labels/segment_ids [B, S] of the caption rows; text_emb [B, E] and image_emb
    [B, E] L2-normalised; logit_scale the log-scale parameter. Negatives span ``task.dp_group``.
    In evaluation (``task.collect`` is a list) the embeddings are collected instead and no loss is
    computed (so no collective runs)."""
    from mks2.training.faults import maybe_poison

    if task.collect is not None:
        task.collect.append((text_emb.detach().float(), image_emb.detach().float()))
        return torch.zeros((), device=logits.device)
    t = task.cfg.train
    loss_caption, _ = causal_lm_loss(logits, labels, segment_ids)
    loss_retrieval, acc = contrastive_loss(text_emb, image_emb, logit_scale, task.dp_group)
    loss = t.caption_loss_weight * loss_caption + t.retrieval_loss_weight * loss_retrieval
    loss = maybe_poison(loss)
    task.sink.record(
        {
            "loss_caption": loss_caption,
            "loss_retrieval": loss_retrieval,
            "retrieval_acc": acc,
            "logit_scale": logit_scale.detach().float().exp().clamp(max=100.0),
        }
    )
    return loss


class Stage1Objective(nn.Module):
    """The module the ZeRO-3 engine wraps: both views in one forward, then both losses."""

    def __init__(self, model: nn.Module, task: Stage1Task):
        super().__init__()
        self.model = model
        self._task = [task]  # a list: not a submodule

    def forward(
        self,
        input_ids: torch.Tensor,  # [2B, S]
        position_ids: torch.Tensor,  # [2B, S]
        segment_ids: torch.Tensor,  # [2B, S]
        labels: torch.Tensor,  # [B, S]
        vision_features: torch.Tensor,  # [B, P, F]
        image_emb: torch.Tensor,  # [B, E]
        ret_eos_index: torch.Tensor,  # [B]
    ) -> torch.Tensor:
        task = self._task[0]
        n_cap = labels.shape[0]
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            segment_ids=segment_ids,
            vision_features=vision_features,
            return_logits=False,
        )
        hidden = out.hidden_states  # [2B, S, D], final-norm output
        logits = self.model.lm_head(hidden[:n_cap])  # [B, S, V]: the vocabulary projection of caption rows only
        text_emb = self.model.retrieval.encode_text(hidden[n_cap:], ret_eos_index)  # [B, E]
        return stage1_loss(
            task,
            logits=logits,
            labels=labels,
            segment_ids=segment_ids[:n_cap],
            text_emb=text_emb,
            image_emb=image_emb,
            logit_scale=self.model.retrieval.logit_scale,
        )


# --------------------------------------------------------------------------------------------
# Pipeline split (mks2.training.pipeline): the stage-1 head and loss; ``ret_eos_index`` is the extra
# --------------------------------------------------------------------------------------------


class Stage1HeadPipe(HeadPipe):
    """Final norm, LM head on the caption rows, retrieval projection on the retrieval rows."""

    retrieval: nn.Module

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, _, segment_ids, eos = inputs
        hidden = self.norm(hidden)  # [2B, S, D]
        n_cap = hidden.shape[0] - eos.shape[0]
        logits = self.lm_head(hidden[:n_cap])  # [B, S, V]
        text_emb = self.retrieval.encode_text(hidden[n_cap:], eos)  # [B, E]
        return logits, segment_ids[:n_cap], text_emb, self.retrieval.logit_scale.reshape(1)


class Stage1PipeLoss:
    """Loss callable of the last pipeline stage: outputs of :class:`Stage1HeadPipe` + labels tuple."""

    def __init__(self, task: Stage1Task):
        self.task = task

    def __call__(self, outputs: tuple[torch.Tensor, ...], labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        logits, segment_ids, text_emb, logit_scale = outputs
        caption_labels, image_emb = labels
        return stage1_loss(
            self.task,
            logits=logits,
            labels=caption_labels,
            segment_ids=segment_ids,
            text_emb=text_emb,
            image_emb=image_emb,
            logit_scale=logit_scale.reshape(()),
        )


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class Stage1Task(StageTask):
    stage = Stage.MVM
    metric_names = ("loss_caption", "loss_retrieval", "retrieval_acc", "logit_scale")

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.collect: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # evaluation: embeddings

    def check(self, cfg: RunConfig) -> list[str]:
        p = super().check(cfg)
        if Stage(cfg.model.stage) != Stage.MVM:
            p.append(f"model.stage={cfg.model.stage.value}: launch/pretrain_mvm.py trains stage 'mvm'")
        # (stage mvm without a vision front-end never gets here: the config's validation rejects it)
        if cfg.data.packing:
            p.append("data.packing: must be false in stage 1 (one captioned image per row for retrieval)")
        if not cfg.data.datasets:
            p.append("data.datasets: stage 1 needs at least one caption dataset")
        return p

    def build_loader(self, cfg: RunConfig, *, dp_rank: int, dp_size: int, state: Any = None) -> Any:
        from mks2.data import build_dataloader
        from mks2.model.vision import load_image_processor, vision_prefix_length

        return build_dataloader(
            cfg,
            rank=dp_rank,
            world_size=dp_size,
            stage=Stage.MVM,
            image_processor=load_image_processor(cfg.model),
            num_prefix_tokens=vision_prefix_length(cfg.model),
            state=state,
        )

    def prepare(self, batch: dict[str, torch.Tensor], vision: Any, device: torch.device) -> dict[str, torch.Tensor]:
        stacked = {k: v.to(device, non_blocking=True) for k, v in stack_views(batch).items()}
        enc = vision.encode(batch["pixel_values"])  # features [B, P, F], pooled [B, E]
        stacked["vision_features"] = enc.features
        stacked["image_emb"] = F.normalize(enc.pooled.float(), dim=-1)
        stacked["ret_eos_index"] = batch["ret_eos_index"].to(device)
        return stacked

    def evaluate(self, trainer: Any) -> dict[str, float]:
        if not self.cfg.data.eval_datasets:
            return {}
        from mks2.training.evaluate import retrieval_eval

        return retrieval_eval(trainer)

    # ---- accounting (StageTask.counts) for the padded layout: caption rows [B, S], retrieval [B, S_r] ----

    def count_samples(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["ret_eos_index"].numel())  # one caption (and its image) per row

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["segment_ids"] != 0).sum() + (batch["ret_segment_ids"] != 0).sum())

    def count_positions(self, batch: dict[str, torch.Tensor]) -> int:
        b = batch["input_ids"].shape[0]  # stack_views pads both views to one [2B, max(S, S_r)] batch
        return 2 * b * max(batch["input_ids"].shape[1], batch["ret_input_ids"].shape[1])

    def count_head_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int((batch["segment_ids"] != 0).sum())  # the LM head runs on the caption view only

    def segment_lengths(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from mks2.training.task import segment_lengths

        return torch.cat([segment_lengths(batch["segment_ids"]), segment_lengths(batch["ret_segment_ids"])])

    def objective(self, model: nn.Module) -> nn.Module:
        return Stage1Objective(model, self)

    def external_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        # logit_scale is read by the loss, not by a RetrievalHead.forward (which never runs).
        return [model.retrieval.logit_scale]

    def pipeline(self, model: nn.Module) -> PipelineSpec:
        return build_pipeline_spec(model, head=Stage1HeadPipe, loss_fn=Stage1PipeLoss(self))

    def pipeline_tuples(self, prepared: dict[str, torch.Tensor]) -> tuple[tuple, tuple]:
        p = prepared
        inputs = (p["input_ids"], p["position_ids"], p["segment_ids"], p["vision_features"], p["ret_eos_index"])
        return inputs, (p["labels"], p["image_emb"])
