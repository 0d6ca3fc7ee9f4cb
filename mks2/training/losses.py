"""Stage-1 objectives (DESIGN §1): the captioning loss and the symmetric text-to-image InfoNCE.

Both are plain functions of tensors so the ZeRO-3 step and the pipeline's last stage share them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mks2.training.distributed import all_gather_no_grad, all_gather_with_grad

IGNORE_INDEX = -100
LOGIT_SCALE_MAX = 100.0


def caption_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy averaged over the labelled tokens (HF convention: the label at
    position t is predicted from position t-1). logits [B, S, V], labels [B, S] (-100 ignored).
    A micro-batch without a single labelled token gives 0 (with a graph), never NaN."""
    shift_logits = logits[:, :-1, :].float()  # [B, S-1, V]
    shift_labels = labels[:, 1:]  # [B, S-1]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = (shift_labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def gather_last_token(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """hidden [B, S, D], index [B] -> hidden[b, index[b]] as [B, D]."""
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, index.to(hidden.device).long()]


def contrastive_loss(
    text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE (CLIP) between this rank's rows and the whole data-parallel batch.

    text_emb [B, E] (L2-normalised, requires grad), image_emb [B, E] (L2-normalised, frozen),
    logit_scale: the learnable log-scale (scalar); exp(logit_scale) is clamped at 100.
    Negatives: every rank's rows, gathered over ``group`` (the data-parallel group); gradients flow
    back to the rank that owns each text row. Returns (loss, text->image top-1 accuracy), both
    averaged over this rank's rows; their mean over ranks is the loss of the global batch.
    """
    b = text_emb.shape[0]
    text_all = all_gather_with_grad(text_emb.float(), group)  # [W*B, E]
    image_all = all_gather_no_grad(image_emb.float(), group)  # [W*B, E]
    offset = _rank_in(group) * b
    targets = torch.arange(offset, offset + b, device=text_emb.device)  # [B]
    scale = logit_scale.float().exp().clamp(max=LOGIT_SCALE_MAX).reshape(())
    logits_t2i = scale * text_emb.float() @ image_all.t()  # [B, W*B]
    logits_i2t = scale * image_emb.float() @ text_all.t()  # [B, W*B]
    loss = 0.5 * (F.cross_entropy(logits_t2i, targets) + F.cross_entropy(logits_i2t, targets))
    acc = (logits_t2i.argmax(dim=-1) == targets).float().mean()
    return loss, acc.detach()


def _rank_in(group) -> int:
    import torch.distributed as dist

    if not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def initial_logit_scale() -> float:
    """CLIP's initial temperature 0.07, as a log-scale."""
    return math.log(1.0 / 0.07)
