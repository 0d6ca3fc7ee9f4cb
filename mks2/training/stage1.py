"""Stage 1 (``model.stage=mvm``): visual information storage into the MVM experts (DESIGN §1).

One micro-batch runs the LLM ONCE on both views of its B captions, stacked along the batch dim:

    rows [0, B):   caption view   = image prefix + caption, labels on caption tokens
    rows [B, 2B):  retrieval view = caption alone (no image), padded to the same length

so every rank calls the same modules the same number of times (ZeRO-3), and the decoder weights
are gathered once per micro-batch instead of twice. The captioning loss reads the first B rows;
the retrieval loss takes the final-norm hidden state at ``ret_eos_index`` of the last B rows,
projects and normalises it, and contrasts it (symmetric InfoNCE, learnable temperature) with the
frozen, normalised pooled image embeddings of the WHOLE data-parallel batch.

That is the padded layout (``data.packing=false``). With ``data.packing`` (the default) a micro-batch is a
token budget of [R, S] rows holding as many (caption view, retrieval view) pairs as fit, each view a
segment of its own (``mks2.data.stage1_packing``): the caption loss is taken at the positions that
predict a caption token (only those go through ``lm_head``), the retrieval loss at each pair's EOS
(``ret_eos_flat``), and both are sums scaled by the step's global counts, so the step's loss is the mean
over the global batch's caption tokens (pairs) however the captions were packed. Negatives are the pairs
of this micro-batch index on every rank (their count varies per rank: a padded gather).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mks2.config import ParallelMode, RunConfig, Stage
from mks2.constants import IGNORE_INDEX
from mks2.model import causal_lm_loss
from mks2.training.losses import caption_targets, contrastive_loss, contrastive_sums, exact_sum
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
# Pipeline split (mks2.training.pipeline): the stage-1 head and loss. The extras carried from the first
# stage to the head are ``ret_eos_index`` (padded layout only) and the frozen image embedding as int32 bits
# --------------------------------------------------------------------------------------------


def image_emb_to_wire(image_emb: torch.Tensor) -> torch.Tensor:
    """Frozen, normalised image embeddings [K, E] (fp32) -> int32 [K + 1, E]: the same bits, one zero row
    appended, to travel with the activations from the first pipeline stage (the only one that runs the
    towers) to the last (where the retrieval loss needs them).

    Integer, because DeepSpeed's pipeline engine gives every floating-point tensor it receives
    ``requires_grad`` and sends a gradient back for it: the frozen target would get a gradient towards a
    stage whose output never required one (an autograd error there). An integer tensor carries no
    gradient, exactly as the target must not. The extra row keeps the tensor non-empty when a micro-batch
    holds no pair (K = 0): no zero-element point-to-point send."""
    emb = image_emb.detach().to(torch.float32).contiguous()
    return torch.cat([emb, emb.new_zeros(1, emb.shape[-1])]).view(torch.int32)


def image_emb_from_wire(bits: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`image_emb_to_wire`: int32 [K + 1, E] -> the fp32 embeddings [K, E], bit for bit."""
    return bits[:-1].view(torch.float32)


class Stage1HeadPipe(HeadPipe):
    """Final norm, LM head on the caption rows, retrieval projection on the retrieval rows."""

    retrieval: nn.Module

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, _, segment_ids, eos, image_bits = inputs
        hidden = self.norm(hidden)  # [2B, S, D]
        n_cap = hidden.shape[0] - eos.shape[0]
        logits = self.lm_head(hidden[:n_cap])  # [B, S, V]
        text_emb = self.retrieval.encode_text(hidden[n_cap:], eos)  # [B, E]
        image_emb = image_emb_from_wire(image_bits)  # [B, E], the frozen target (no gradient)
        return logits, segment_ids[:n_cap], text_emb, self.retrieval.logit_scale.reshape(1), image_emb


class Stage1PipeLoss:
    """Loss callable of the last pipeline stage: outputs of :class:`Stage1HeadPipe` + labels tuple."""

    def __init__(self, task: Stage1Task):
        self.task = task

    def __call__(self, outputs: tuple[torch.Tensor, ...], labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        logits, segment_ids, text_emb, logit_scale, image_emb = outputs
        (caption_labels,) = labels
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
# Packed micro-batches (data.packing=true): [R, S] rows of (caption, retrieval) view segments
# --------------------------------------------------------------------------------------------


def packed_stage1_loss(
    task: Stage1Task,
    *,
    caption_logits: torch.Tensor,
    caption_targets: torch.Tensor,
    text_emb: torch.Tensor,
    image_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    caption_scale: torch.Tensor,
    retrieval_scale: torch.Tensor,
) -> torch.Tensor:
    """Weighted caption + retrieval loss of one packed micro-batch; records the metrics in ``task.sink``.

    caption_logits [T, V] at the T positions predicting caption_targets [T]; text_emb / image_emb [K, E]
    L2-normalised (K pairs, may be 0). ``caption_scale`` = micro-batches of the step (dp x GAS) / caption
    tokens of the step (all ranks), ``retrieval_scale`` the same per pair: the loop's (and DeepSpeed's)
    mean over the step's micro-batches of these scaled sums is the global-batch mean. Evaluation
    (``task.collect``) never runs packed batches."""
    from mks2.training.faults import maybe_poison

    t = task.cfg.train
    cap_sum = exact_sum(F.cross_entropy(caption_logits.float(), caption_targets, reduction="none"))
    ret_sum, correct = contrastive_sums(text_emb, image_emb, logit_scale, task.dp_group)
    loss_caption = cap_sum * caption_scale
    loss_retrieval = ret_sum * retrieval_scale
    loss = t.caption_loss_weight * loss_caption + t.retrieval_loss_weight * loss_retrieval
    loss = maybe_poison(loss)
    task.sink.record(
        {
            "loss_caption": loss_caption,
            "loss_retrieval": loss_retrieval,
            "retrieval_acc": correct * retrieval_scale,
            "logit_scale": logit_scale.detach().float().exp().clamp(max=100.0),
        }
    )
    return loss


def _eos_states(hidden: torch.Tensor, ret_eos_flat: torch.Tensor) -> torch.Tensor:
    """hidden [R, S, D], flat indices [K] -> [K, 1, D] (one-token rows for ``RetrievalHead.encode_text``)."""
    return hidden.reshape(-1, 1, hidden.shape[-1])[ret_eos_flat]


class PackedStage1Objective(Stage1Objective):
    """The ZeRO-3 module for packed micro-batches: one forward over [R, S] rows, then both losses. The
    held-out evaluation's padded batches (``ret_eos_index``) take the padded path of the parent."""

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        if "ret_eos_index" in batch:
            return super().forward(**batch)
        return self.forward_packed(**batch)

    def forward_packed(
        self,
        input_ids: torch.Tensor,  # [R, S]
        position_ids: torch.Tensor,  # [R, S]
        segment_ids: torch.Tensor,  # [R, S]
        labels: torch.Tensor,  # [R, S]
        vision_features: torch.Tensor,  # [K, P, F], K may be 0
        image_emb: torch.Tensor,  # [K, E]
        ret_eos_flat: torch.Tensor,  # [K]
        caption_scale: torch.Tensor,  # [1]
        retrieval_scale: torch.Tensor,  # [1]
    ) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids,
                         vision_features=vision_features, return_logits=False)  # fmt: skip
        hidden = out.hidden_states  # [R, S, D]
        pred, targets = caption_targets(labels, segment_ids)  # [T], [T]
        logits = self.model.lm_head(hidden.reshape(-1, hidden.shape[-1])[pred])  # [T, V]
        eos = _eos_states(hidden, ret_eos_flat)
        text_emb = self.model.retrieval.encode_text(eos, torch.zeros_like(ret_eos_flat))  # [K, E]
        return packed_stage1_loss(
            self._task[0], caption_logits=logits, caption_targets=targets, text_emb=text_emb, image_emb=image_emb,
            logit_scale=self.model.retrieval.logit_scale, caption_scale=caption_scale.reshape(()),
            retrieval_scale=retrieval_scale.reshape(()),
        )  # fmt: skip


class PackedStage1HeadPipe(HeadPipe):
    """Last pipeline layer for packed micro-batches: final norm, LM head and retrieval projection on all
    [R, S] positions (the loss picks the caption positions and EOS states; labels carry their indices). The
    one activation of varying shape is the frozen image embedding of the micro-batch's K pairs."""

    retrieval: nn.Module

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, _, segment_ids, image_bits = inputs
        hidden = self.norm(hidden)  # [R, S, D]
        logits = self.lm_head(hidden)  # [R, S, V]
        proj = self.retrieval.proj(hidden.to(self.retrieval.proj.weight.dtype))  # [R, S, E]
        image_emb = image_emb_from_wire(image_bits)  # [K, E], the frozen target (no gradient)
        return logits, segment_ids, proj, self.retrieval.logit_scale.reshape(1), image_emb


class PackedStage1PipeLoss:
    """Loss callable of the last pipeline stage for packed micro-batches."""

    def __init__(self, task: Stage1Task):
        self.task = task

    def __call__(self, outputs: tuple[torch.Tensor, ...], labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        logits, segment_ids, proj, logit_scale, image_emb = outputs
        caption_labels, ret_eos_flat, caption_scale, retrieval_scale = labels
        pred, targets = caption_targets(caption_labels, segment_ids)
        text = proj.reshape(-1, proj.shape[-1])[ret_eos_flat]  # [K, E]
        return packed_stage1_loss(
            self.task, caption_logits=logits.reshape(-1, logits.shape[-1])[pred], caption_targets=targets,
            text_emb=F.normalize(text.float(), dim=-1), image_emb=image_emb, logit_scale=logit_scale.reshape(()),
            caption_scale=caption_scale.reshape(()), retrieval_scale=retrieval_scale.reshape(()),
        )  # fmt: skip


def packed(batch: dict[str, torch.Tensor]) -> bool:
    """Whether a loader batch is a packed stage-1 micro-batch (else the padded two-view layout)."""
    return "ret_eos_flat" in batch


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class Stage1Task(StageTask):
    stage = Stage.MVM
    metric_names = ("loss_caption", "loss_retrieval", "retrieval_acc", "logit_scale")

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.collect: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # evaluation: embeddings
        self._image_dim: int | None = None

    def check(self, cfg: RunConfig) -> list[str]:
        p = super().check(cfg)
        if Stage(cfg.model.stage) != Stage.MVM:
            p.append(f"model.stage={cfg.model.stage.value}: launch/pretrain_mvm.py trains stage 'mvm'")
        # (stage mvm without a vision front-end never gets here: the config's validation rejects it)
        if cfg.data.packing:
            p += packing_problems(cfg)
            if cfg.parallel.mode == ParallelMode.PIPELINE and cfg.data.eval_datasets and cfg.train.eval_interval >= 0:
                p.append(
                    "data.packing with parallel.mode=pipeline: the held-out retrieval evaluation runs padded "
                    "batches, whose activation shape differs from the packed [R, seq_len]; set "
                    "train.eval_interval=-1 (or data.packing=false) in pipeline mode"
                )
        if not cfg.data.datasets:
            p.append("data.datasets: stage 1 needs at least one caption dataset")
        return p

    def build_loader(self, cfg: RunConfig, *, dp_rank: int, dp_size: int, state: Any = None) -> Any:
        from mks2.data import build_dataloader
        from mks2.model.vision import load_image_processor, vision_prefix_length
        from mks2.training.batch import grad_accumulation_steps

        return build_dataloader(
            cfg,
            rank=dp_rank,
            world_size=dp_size,
            stage=Stage.MVM,
            image_processor=load_image_processor(cfg.model),
            num_prefix_tokens=vision_prefix_length(cfg.model),
            state=state,
            grad_accumulation_steps=grad_accumulation_steps(cfg, dp_size),
        )

    def prepare(self, batch: dict[str, torch.Tensor], vision: Any, device: torch.device) -> dict[str, torch.Tensor]:
        """``vision`` None: a pipeline stage that runs no tower (the last of several); it needs only the
        labels, the frozen image embedding reaches it with the activations (:func:`image_emb_to_wire`)."""
        if packed(batch):
            return self._prepare_packed(batch, vision, device)
        stacked = {k: v.to(device, non_blocking=True) for k, v in stack_views(batch).items()}
        stacked["ret_eos_index"] = batch["ret_eos_index"].to(device)
        if vision is not None:
            enc = vision.encode(batch["pixel_values"])  # features [B, P, F], pooled [B, E]
            stacked["vision_features"] = enc.features
            stacked["image_emb"] = F.normalize(enc.pooled.float(), dim=-1)
        return stacked

    def _prepare_packed(self, batch: dict[str, torch.Tensor], vision: Any, device: torch.device) -> dict[str, Any]:
        from mks2.training.stage2 import vision_features

        out = {k: batch[k].to(device, non_blocking=True) for k in
               ("input_ids", "position_ids", "segment_ids", "labels", "ret_eos_flat")}  # fmt: skip
        pixels = batch.get("pixel_values")
        if vision is None:
            pass  # labels only (see prepare)
        elif pixels is not None and pixels.shape[0] > 0:
            enc = vision.encode(pixels)  # features [K, P, F], pooled [K, E]
            out["vision_features"] = enc.features
            out["image_emb"] = F.normalize(enc.pooled.float(), dim=-1)
        else:  # a micro-batch without pairs (padding of a short step): the mapping still runs (ZeRO-3)
            out["vision_features"] = vision_features(vision, None, device)
            out["image_emb"] = torch.zeros(0, self._embed_dim(), device=device)
        n = batch["step_micro_batches"].double()
        out["caption_scale"] = (n / batch["step_caption_tokens"].clamp(min=1)).float().reshape(1).to(device)
        out["retrieval_scale"] = (n / batch["step_pairs"].clamp(min=1)).float().reshape(1).to(device)
        return out

    def _embed_dim(self) -> int:
        if self._image_dim is None:
            from mks2.model.vision import vision_embed_dim

            self._image_dim = vision_embed_dim(self.cfg.model)
        return self._image_dim

    def evaluate(self, trainer: Any) -> dict[str, float]:
        if not self.cfg.data.eval_datasets:
            return {}
        from mks2.training.evaluate import retrieval_eval

        return retrieval_eval(trainer)

    # ---- accounting (StageTask.counts) for the padded layout: caption rows [B, S], retrieval [B, S_r] ----
    # A packed micro-batch ([R, S] rows, both views as segments; ``packed(batch)``) is one view for the
    # StageTask defaults, except samples (pairs) and the LM head (caption-loss positions only in zero3).

    def count_samples(self, batch: dict[str, torch.Tensor]) -> int:
        if packed(batch):
            return int(batch["ret_eos_flat"].numel())  # pairs
        return int(batch["ret_eos_index"].numel())  # one caption (and its image) per row

    def count_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if packed(batch):
            return super().count_tokens(batch)  # both views, image prefix included
        return int((batch["segment_ids"] != 0).sum() + (batch["ret_segment_ids"] != 0).sum())

    def count_positions(self, batch: dict[str, torch.Tensor]) -> int:
        if packed(batch):
            return super().count_positions(batch)  # R x S, padding included
        b = batch["input_ids"].shape[0]  # stack_views pads both views to one [2B, max(S, S_r)] batch
        return 2 * b * max(batch["input_ids"].shape[1], batch["ret_input_ids"].shape[1])

    def count_head_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if packed(batch):
            if self.cfg.parallel.mode == ParallelMode.PIPELINE:
                return super().count_positions(batch)  # the pipeline head projects every position
            return int(caption_targets(batch["labels"], batch["segment_ids"])[0].numel())
        return int((batch["segment_ids"] != 0).sum())  # the LM head runs on the caption view only

    def count_retrieval_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if packed(batch) and self.cfg.parallel.mode == ParallelMode.PIPELINE:
            return super().count_positions(batch)  # the pipeline head projects every position
        return self.count_samples(batch)  # encode_text projects each pair's EOS state

    def segment_lengths(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from mks2.training.task import segment_lengths

        if packed(batch):
            return segment_lengths(batch["segment_ids"])
        return torch.cat([segment_lengths(batch["segment_ids"]), segment_lengths(batch["ret_segment_ids"])])

    def objective(self, model: nn.Module) -> nn.Module:
        if self.cfg.data.packing:
            return PackedStage1Objective(model, self)
        return Stage1Objective(model, self)

    def external_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        # logit_scale is read by the loss, not by a RetrievalHead.forward (which never runs).
        return [model.retrieval.logit_scale]

    def pipeline(self, model: nn.Module) -> PipelineSpec:
        if self.cfg.data.packing:
            return build_pipeline_spec(model, head=PackedStage1HeadPipe, loss_fn=PackedStage1PipeLoss(self))
        return build_pipeline_spec(model, head=Stage1HeadPipe, loss_fn=Stage1PipeLoss(self))

    def pipeline_tuples(self, prepared: dict[str, torch.Tensor]) -> tuple[tuple, tuple]:
        """(first-stage inputs, last-stage labels). The frozen image embedding rides with the activations
        as int32 bits (:func:`image_emb_to_wire`); a stage that ran no tower has no inputs to give (DeepSpeed
        reads the inputs on the first stage only)."""
        p = prepared
        first = "vision_features" in p
        if "ret_eos_flat" in p:  # packed: [R, S] activations; the caption/EOS indices ride with the labels
            inputs = (p["input_ids"], p["position_ids"], p["segment_ids"], p["vision_features"],
                      image_emb_to_wire(p["image_emb"])) if first else ()  # fmt: skip
            return inputs, (p["labels"], p["ret_eos_flat"], p["caption_scale"], p["retrieval_scale"])
        inputs = (p["input_ids"], p["position_ids"], p["segment_ids"], p["vision_features"], p["ret_eos_index"],
                  image_emb_to_wire(p["image_emb"])) if first else ()  # fmt: skip
        return inputs, (p["labels"],)


def packing_problems(cfg: RunConfig) -> list[str]:
    """Config problems of packed stage 1: the budget must hold at least one (caption, retrieval) pair."""
    from mks2.data.loader import tokens_per_micro_batch
    from mks2.data.stage1_packing import max_caption_view, min_pair_tokens
    from mks2.model.vision import vision_prefix_length

    try:
        P = vision_prefix_length(cfg.model)
    except ValueError:
        return []  # an unreadable vision checkpoint is reported by check_paths
    S = cfg.data.seq_len
    budget = tokens_per_micro_batch(cfg)
    if budget % S:
        return []  # reported by the data section's own check
    rows = budget // S
    need = min_pair_tokens(P)
    if budget < need or max_caption_view(S, rows, P) < P + 3:
        return [
            f"data.tokens_per_micro_batch={budget} (rows of data.seq_len={S}) cannot hold one caption/retrieval "
            f"pair: the smallest needs {need} tokens (image prefix {P} + BOS/caption/EOS, twice for the two views)"
        ]
    return []
