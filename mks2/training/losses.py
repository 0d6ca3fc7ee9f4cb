"""Stage-1 retrieval objective (DESIGN §1): the symmetric text-to-image InfoNCE.

A plain function of tensors so the ZeRO-3 step and the pipeline's last stage share it. The captioning
loss is the model's own ``mks2.model.causal_lm_loss``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mks2.training.distributed import all_gather_no_grad, all_gather_with_grad

LOGIT_SCALE_MAX = 100.0


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
    """This process's rank in ``group`` (0 without an initialised process group: single-process tests)."""
    if not dist.is_initialized():
        return 0
    return dist.get_rank(group)
