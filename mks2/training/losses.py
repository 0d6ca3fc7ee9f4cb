"""Stage-1 retrieval objective (DESIGN §1): the symmetric text-to-image InfoNCE.

Plain functions of tensors so the ZeRO-3 step and the pipeline's last stage share them. The padded layout
(``data.packing=false``) uses :func:`contrastive_loss` and the model's ``causal_lm_loss`` (means per
micro-batch); packed micro-batches (``mks2.data.stage1_packing``) use the SUMS below, which the stage-1
loss scales by the step's global counts.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mks2.constants import IGNORE_INDEX
from mks2.training import distributed
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

    A pair whose image embedding is all zeros (the frozen front-end's answer for an undecodable image,
    ``mks2.training.frozen_vision``) takes no part: neither as a row nor as a negative of another row.
    """
    b = text_emb.shape[0]
    text_all = all_gather_with_grad(text_emb.float(), group)  # [W*B, E]
    image_all = all_gather_no_grad(image_emb.float(), group)  # [W*B, E]
    offset = _rank_in(group) * b
    targets = torch.arange(offset, offset + b, device=text_emb.device)  # [B]
    scale = logit_scale.float().exp().clamp(max=LOGIT_SCALE_MAX).reshape(())
    valid_all = image_all.abs().amax(dim=-1) > 0  # [W*B]: pairs with a real image
    valid = valid_all[offset : offset + b]  # [B]: this rank's rows
    # A finite fill (not -inf): a row with no valid column at all stays finite and is weighted 0 below.
    logits_t2i = (scale * text_emb.float() @ image_all.t()).masked_fill(~valid_all, _MASKED)  # [B, W*B]
    logits_i2t = (scale * image_emb.float() @ text_all.t()).masked_fill(~valid_all, _MASKED)  # [B, W*B]
    per_row = 0.5 * (
        F.cross_entropy(logits_t2i, targets, reduction="none") + F.cross_entropy(logits_i2t, targets, reduction="none")
    )  # [B]
    weight = valid.float()
    n = weight.sum().clamp(min=1.0)
    loss = (per_row * weight).sum() / n
    acc = ((logits_t2i.argmax(dim=-1) == targets).float() * weight).sum() / n
    return loss, acc.detach()


_MASKED = -1e9  # the logit of a pair left out (scale * cosine is at most 100 in magnitude)


def _rank_in(group) -> int:
    """This process's rank in ``group`` (0 without an initialised process group: single-process tests)."""
    if not dist.is_initialized():
        return 0
    return dist.get_rank(group)


def contrastive_sums(
    text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor, group=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE over a data-parallel batch whose pair count differs per rank (packed stage 1).

    text_emb [n, E] (L2-normalised, requires grad), image_emb [n, E] (frozen); n may be 0 and differ per
    rank. Every rank's rows are gathered (padded to the largest n for the collective, padding dropped), so
    the negatives are the N = sum(n) pairs of this micro-batch index on all ranks; gradients flow back to
    the rank owning each text row. Returns (sum over this rank's rows of 0.5 * (CE_t2i + CE_i2t), number
    of its rows whose text ranks its own image first); divided by N (all ranks) they are the global
    batch's mean loss and accuracy."""
    n = text_emb.shape[0]
    counts = gather_counts(n, text_emb.device, group)
    text_all = all_gather_varlen(text_emb.float(), counts, group, grad=True)  # [N, E]
    image_all = all_gather_varlen(image_emb.float(), counts, group, grad=False)  # [N, E]
    offset = sum(counts[: _rank_in(group)])
    targets = torch.arange(offset, offset + n, device=text_emb.device)  # [n]
    scale = logit_scale.float().exp().clamp(max=LOGIT_SCALE_MAX).reshape(())
    # Pairs with an all-zero image embedding (undecodable images, as in contrastive_loss) take no part.
    valid_all = image_all.abs().amax(dim=-1) > 0  # [N]
    weight = valid_all[offset : offset + n].float()  # [n]
    logits_t2i = (scale * text_emb.float() @ image_all.t()).masked_fill(~valid_all, _MASKED)  # [n, N]
    logits_i2t = (scale * image_emb.float() @ text_all.t()).masked_fill(~valid_all, _MASKED)  # [n, N]
    per_row = F.cross_entropy(logits_t2i, targets, reduction="none") + F.cross_entropy(
        logits_i2t, targets, reduction="none"
    )  # [n]
    total = 0.5 * exact_sum(per_row * weight)
    correct = ((logits_t2i.argmax(dim=-1) == targets).float() * weight).sum() if n else text_emb.new_zeros(())
    return total, correct.detach()


def exact_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of a 1-d fp32 tensor accumulated in fp64, returned as fp32: the result no longer depends on the
    reduction order the kernel picks (which varies with the tensor's length and memory layout), so a resumed
    run reproduces the uninterrupted one bit for bit although the packed pair counts vary per micro-batch."""
    return x.double().sum().float()


def gather_counts(n: int, device: torch.device, group=None) -> list[int]:
    """Every rank's ``n`` in rank order (one tiny all-gather; through ``mks2.training.distributed``, which
    places it on the collective device)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return [n]
    return [int(v) for v in all_gather_no_grad(torch.tensor([n], dtype=torch.int64, device=device), group).tolist()]


class _GatherVarlenWithGrad(torch.autograd.Function):
    """All-gather of [n_r, E] rows whose count differs per rank: padded to max(n) for the collective, the
    padding dropped after. Backward: the gradients of the gathered rows from every rank's loss are summed
    (all-reduce of the padded [W * max(n), E]) and each rank keeps its own rows, as ``all_gather_with_grad``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: list[int], group) -> torch.Tensor:  # [n_r, E] -> [sum(n), E]
        ctx.group, ctx.counts = group, counts
        width = max(counts)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = all_gather_no_grad(padded, group).split(width)
        return torch.cat([p[:n] for p, n in zip(parts, counts)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: [sum(n), E]
        counts, width = ctx.counts, max(ctx.counts)
        padded = grad.new_zeros((len(counts) * width, *grad.shape[1:]))
        offset = 0
        for r, n in enumerate(counts):
            padded[r * width : r * width + n] = grad[offset : offset + n]
            offset += n
        distributed.all_reduce(padded, group=ctx.group)  # the one collective helper (device placement)
        me = _rank_in(ctx.group)
        return padded[me * width : me * width + counts[me]], None, None


def all_gather_varlen(x: torch.Tensor, counts: list[int], group=None, *, grad: bool) -> torch.Tensor:
    """``x`` [n_r, ...] of every rank of ``group`` concatenated in rank order (``counts``: every rank's n_r);
    ``grad=True``: gradient-correct. A world of one (or no rows anywhere) returns ``x``."""
    if len(counts) == 1 or max(counts) == 0:
        return x
    if grad:
        return _GatherVarlenWithGrad.apply(x, counts, group)
    with torch.no_grad():
        width = max(counts)
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        return torch.cat([p[:n] for p, n in zip(all_gather_no_grad(padded, group).split(width), counts)])


def caption_targets(labels: torch.Tensor, segment_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions that predict a caption token and their targets, for a packed micro-batch.

    labels / segment_ids [R, S] (HF convention: position t predicts labels[t + 1]; no prediction crosses a
    segment). Returns (flat indices t into [R * S] [T], targets [T]) -- so only T rows go through the
    vocabulary projection instead of R * S."""
    target = labels[:, 1:]
    same = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
    valid = same & (target != IGNORE_INDEX)  # [R, S-1]
    r, t = torch.nonzero(valid, as_tuple=True)
    return r * labels.shape[1] + t, target[r, t]
