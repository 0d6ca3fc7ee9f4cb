"""Stage 2 (``model.stage=mome``): multimodal knowledge collaboration by instruction tuning (DESIGN §1).

The model continues from a stage-1 checkpoint (``model.init_from_stage1``, see ``from_stage1.py``): the
MLP and MVM experts of every MVM layer are mixed per token by a trainable router, each expert carries a
LoRA adapter, and only the adapters, routers and the visual mapping train. Without a stage-1 checkpoint
the same step trains the baselines (``INST-LoRA``: a base Llama + LoRA; see ``ablations.py``).

Data: a weighted mix of pretokenized text-only (Alpaca-style) and multimodal (LLaVA-style) instruction
datasets (``train.sft_data`` keeps only one kind, for the ablations), packed into rows; a micro-batch may
hold both kinds. The loss is next-token cross-entropy on the answer tokens only (the datasets' loss mask:
answers and their EOS), averaged over the micro-batch's answer tokens.

ZeRO-3 rule (DESIGN §2): the frozen vision towers run OUTSIDE the engine (``FrozenVision``); inside it the
trainable mapping runs on every micro-batch of every rank, on zero images when a micro-batch has none
(``vision_features`` is then an empty [0, P, F] tensor), so every rank gathers the same partitioned
modules; both MoME experts always run on every token.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from mks2.config import ConfigError, RunConfig, SFTData, Stage, VisionKind
from mks2.model import causal_lm_loss
from mks2.training.from_stage1 import Stage1Source, adopt_stage1_config, load_stage1_weights, locate_stage1
from mks2.training.pipeline import HeadPipe, PipelineSpec, build_pipeline_spec
from mks2.training.task import StageTask

log = logging.getLogger("mks2.training")


# --------------------------------------------------------------------------------------------
# Data selection (train.sft_data)
# --------------------------------------------------------------------------------------------


def dataset_has_images(path: str) -> bool:
    """Whether a pretokenized dataset is of a kind with images (llava, caption). ``path`` is a real path:
    demo placeholders are resolved by the launcher (``mks2.demo.resolve``) before the task is built."""
    from mks2.data.dataset import read_manifest
    from mks2.data.formats import KIND_HAS_IMAGE

    kind = read_manifest(path)["kind"]
    return bool(KIND_HAS_IMAGE.get(kind, False))


def select_sft_datasets(cfg: RunConfig) -> list[str]:
    """Apply ``train.sft_data`` to ``cfg.data.datasets`` in place; returns notes. Raises ConfigError when
    nothing of the requested kind is left."""
    choice = SFTData(cfg.train.sft_data)
    if choice == SFTData.ALL:
        return []
    keep, dropped = [], []
    for src in cfg.data.datasets:
        with_images = dataset_has_images(src.path)
        (keep if with_images == (choice == SFTData.MULTIMODAL) else dropped).append(src)
    if not keep:
        kinds = "with images" if choice == SFTData.MULTIMODAL else "without images"
        listing = ", ".join(s.path for s in cfg.data.datasets) or "none"
        raise ConfigError([f"train.sft_data={choice.value}: none of data.datasets is {kinds} (datasets: {listing})"])
    cfg.data.datasets = keep
    return [f"train.sft_data={choice.value}: dropped {', '.join(s.path for s in dropped)}"] if dropped else []


# --------------------------------------------------------------------------------------------
# The loss (shared by the ZeRO-3 objective and the last pipeline stage)
# --------------------------------------------------------------------------------------------


def sft_loss(
    task: Stage2Task, *, logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor, n_images: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the answer tokens of one micro-batch; records the metrics.

    logits [B, S, V], labels / segment_ids [B, S] (labels -100 outside answers), n_images: 0-d count."""
    from mks2.training.faults import maybe_poison

    loss, count = causal_lm_loss(logits, labels, segment_ids)
    if task.collect is not None:  # evaluation: per-row [B, 2] (loss sum, answer tokens), no metrics
        rows = [
            causal_lm_loss(logits[b : b + 1], labels[b : b + 1], segment_ids[b : b + 1]) for b in range(len(logits))
        ]
        task.collect.append(torch.stack([torch.stack([m.detach().float() * n, n.float()]) for m, n in rows]))
        return loss
    loss = maybe_poison(loss)
    task.sink.record({"answer_tokens": count.float(), "images": n_images.float()})
    return loss


class SFTObjective(nn.Module):
    """The module the ZeRO-3 engine wraps: the model on the packed rows, then :func:`sft_loss`."""

    def __init__(self, model: nn.Module, task: Stage2Task):
        super().__init__()
        self.model = model
        self._task = [task]  # a list: not a submodule

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, S]
        position_ids: torch.Tensor,  # [B, S]
        segment_ids: torch.Tensor,  # [B, S]
        labels: torch.Tensor,  # [B, S]
        vision_features: torch.Tensor | None,  # [N, P, F], N may be 0; None for a text-only model
        n_images: torch.Tensor,  # 0-d
    ) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            position_ids=position_ids,
            segment_ids=segment_ids,
            vision_features=vision_features,
            return_logits=True,
        )
        return sft_loss(self._task[0], logits=out.logits, labels=labels, segment_ids=segment_ids, n_images=n_images)


# --------------------------------------------------------------------------------------------
# Pipeline split (mks2.training.pipeline): the stage-2 head and loss; no extra tensors are carried
# --------------------------------------------------------------------------------------------


class SFTHeadPipe(HeadPipe):
    """Final norm + LM head -> (logits [B, S, V], segment_ids)."""

    takes = ("norm", "lm_head")  # no retrieval rows in stage 2

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        hidden, _, segment_ids = inputs
        return self.lm_head(self.norm(hidden)), segment_ids


class SFTPipeLoss:
    """Loss callable of the last pipeline stage: (logits, segment_ids) + (labels, n_images)."""

    def __init__(self, task: Stage2Task):
        self.task = task

    def __call__(self, outputs: tuple[torch.Tensor, ...], labels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        logits, segment_ids = outputs
        answer_labels, n_images = labels
        return sft_loss(self.task, logits=logits, labels=answer_labels, segment_ids=segment_ids, n_images=n_images)


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


class Stage2Task(StageTask):
    """Stage-2 instruction tuning (see module docstring).

    Constructing the task prepares ``cfg`` in place: with ``model.init_from_stage1`` the architecture (and
    ``model.init_from``) are taken from the stage-1 run, and ``train.sft_data`` filters ``data.datasets``.
    Expects demo placeholders to be resolved already (``mks2.demo.resolve``), as the launcher does."""

    stage = Stage.MOME
    metric_names = ("answer_tokens", "images")

    def __init__(self, cfg: RunConfig):
        super().__init__(cfg)
        self.collect: list[torch.Tensor] | None = None  # evaluation: per micro-batch [B, 2] (loss sum, tokens)
        self.stage1: Stage1Source | None = None
        self.notes: list[str] = []
        if cfg.model.init_from_stage1:
            self.stage1 = locate_stage1(cfg.model.init_from_stage1)
            self.notes += adopt_stage1_config(cfg, self.stage1)
        self.notes += select_sft_datasets(cfg)

    def check(self, cfg: RunConfig) -> list[str]:
        p = super().check(cfg)  # every input path exists (init_from, vision tower, datasets)
        if Stage(cfg.model.stage) != Stage.MOME:
            p.append(f"model.stage={Stage(cfg.model.stage).value}: launch/finetune_mome.py trains stage 'mome'")
        if not cfg.data.datasets:
            p.append("data.datasets: stage 2 needs at least one instruction dataset")
        if VisionKind(cfg.model.vision.kind) == VisionKind.NONE:
            p.append(
                "model.vision.kind=none: the trainer keeps a vision front-end in stage 2 (text-only data trains "
                "fine with one; set model.vision.kind/path, e.g. to the stage-1 run's)"
            )
        return p

    # ---- model ----------------------------------------------------------------------------------

    def build_model(self, cfg: RunConfig, *, weight_gather=None, **build: Any) -> nn.Module:
        from mks2.model import build_model

        # base from init_from (if any), fresh LoRA/router; ``build``: stage-local / read-once options
        model = build_model(cfg, weight_gather=weight_gather, **build)
        if self.stage1 is not None:
            load_stage1_weights(model, self.stage1, weight_gather=weight_gather)
        return model

    # ---- data -----------------------------------------------------------------------------------

    def build_loader(self, cfg: RunConfig, *, dp_rank: int, dp_size: int, state: Any = None) -> Any:
        from mks2.data import build_dataloader

        kw: dict[str, Any] = {}
        if VisionKind(cfg.model.vision.kind) != VisionKind.NONE:
            from mks2.model.vision import load_image_processor, vision_prefix_length

            kw = {
                "image_processor": load_image_processor(cfg.model),
                "num_prefix_tokens": vision_prefix_length(cfg.model),
            }
        return build_dataloader(cfg, rank=dp_rank, world_size=dp_size, stage=Stage.MOME, state=state, **kw)

    def prepare(self, batch: dict[str, torch.Tensor], vision: Any, device: torch.device) -> dict[str, torch.Tensor]:
        out = {k: batch[k].to(device, non_blocking=True) for k in ("input_ids", "position_ids", "labels")}
        out["segment_ids"] = batch["segment_ids"].to(device, non_blocking=True).long()
        pixels = batch.get("pixel_values")
        n = 0 if pixels is None else pixels.shape[0]
        out["n_images"] = torch.tensor(float(n), device=device)
        out["vision_features"] = vision_features(vision, pixels, device)
        return out

    def evaluate(self, trainer: Any) -> dict[str, float]:
        if not self.cfg.data.eval_datasets:
            return {}
        from mks2.training.evaluate import sft_eval

        return sft_eval(trainer, [dataset_has_images(src.path) for src in self.cfg.data.eval_datasets])

    # ---- engine ---------------------------------------------------------------------------------

    def objective(self, model: nn.Module) -> nn.Module:
        return SFTObjective(model, self)

    def pipeline(self, model: nn.Module) -> PipelineSpec:
        return build_pipeline_spec(model, head=SFTHeadPipe, loss_fn=SFTPipeLoss(self))

    def pipeline_tuples(self, prepared: dict[str, torch.Tensor]) -> tuple[tuple, tuple]:
        p = prepared
        vf = p["vision_features"]
        if vf is None:  # a pipeline tuple holds tensors only
            vf = torch.zeros(0, device=p["input_ids"].device)
        return (p["input_ids"], p["position_ids"], p["segment_ids"], vf), (p["labels"], p["n_images"])


def vision_features(vision: Any, pixels: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """Frozen-tower features of a micro-batch's images [N, P, F], an empty [0, P, F] tensor when it holds
    none (the mapping still runs: ZeRO-3), or None for a model without a vision front-end."""
    if vision is None:
        return None
    if pixels is not None and pixels.shape[0] > 0:
        return vision.encode(pixels).features
    fe = vision.front_end  # the mapping casts its input to its own dtype, so fp32 zeros fit any precision
    return torch.zeros(0, fe.num_prefix_tokens, fe.feature_dim, device=device)
