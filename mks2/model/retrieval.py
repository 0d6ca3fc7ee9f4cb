"""Stage-1 text-to-image retrieval head (DESIGN §1): text projection + learnable temperature.

The caption runs through the LLM without the image prefix; its last-layer state at the final EOS
token goes through ``proj`` into the vision embedding size and is L2-normalised. The image side is
the frozen vision encoder's pooled output, L2-normalised. Logits are ``scale() * text @ image.T``
(symmetric InfoNCE, CLIP style); the loss itself lives in ``mks2.training``. ``recall_at_k`` is the
retrieval metric over such embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RetrievalHead(nn.Module):
    """``proj`` Linear(hidden -> vision_dim, no bias) and ``logit_scale`` (log of the inverse temperature).

    Args:
        hidden_size: LLM width D.
        vision_dim: width of the vision encoder's pooled output.
        init_temperature: initial softmax temperature; ``logit_scale`` starts at ln(1 / init_temperature).
        max_scale: upper clamp of ``exp(logit_scale)`` (CLIP's 100: keeps the logits from exploding).
    """

    def __init__(self, hidden_size: int, vision_dim: int, *, init_temperature: float = 0.07, max_scale: float = 100.0):
        super().__init__()
        self.proj = nn.Linear(hidden_size, vision_dim, bias=False)
        # Shape [1], not 0-dim: DeepSpeed's zero.Init cannot partition a 0-dim parameter (it broadcasts
        # ``param.view(torch.uint8)``, which a 0-dim tensor refuses); scale() still returns a 0-dim value.
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(1.0 / init_temperature)))
        self.max_scale = max_scale

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at ``max_scale`` (0-dim, fp32). Above the clamp the gradient to
        ``logit_scale`` is zero, so it stops growing."""
        return self.logit_scale.float().exp().clamp(max=self.max_scale).reshape(())

    def encode_text(self, hidden_states: torch.Tensor, eos_index: torch.Tensor) -> torch.Tensor:
        """hidden_states [B, S, D] (final-norm output), eos_index [B] -> [B, vision_dim] unit vectors (fp32)."""
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states: expected [B, S, D], got {tuple(hidden_states.shape)}")
        if eos_index.shape != hidden_states.shape[:1]:
            b = hidden_states.shape[0]
            raise ValueError(f"eos_index: expected shape [{b}] (one index per row), got {tuple(eos_index.shape)}")
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
        eos_state = hidden_states[rows, eos_index.to(device=hidden_states.device, dtype=torch.long)]  # [B, D]
        text = self.proj(eos_state.to(self.proj.weight.dtype))  # [B, vision_dim]
        # Normalise in fp32: bf16 norms of 1k-dim vectors lose the precision the contrastive logits need.
        return F.normalize(text.float(), dim=-1)

    @staticmethod
    def encode_image(pooled: torch.Tensor) -> torch.Tensor:
        """Vision encoder pooled output [B, vision_dim] -> unit vectors (fp32)."""
        return F.normalize(pooled.float(), dim=-1)

    def extra_repr(self) -> str:
        return f"max_scale={self.max_scale}"


def recall_at_k(text: torch.Tensor, image: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, float]:
    """The one text-to-image recall@K (training's held-out evaluation and ``mks2.eval`` both use it).

    text, image [N, E] L2-normalised, row i of each belongs together -> {K: fraction of captions whose
    own image ranks in the top K of the whole gallery}. An image scoring exactly as high as the true one
    counts against it: ties are misses (the honest, pessimistic rank), so a collapsed model that gives
    every image the same score gets 0, not a perfect recall."""
    sims = text.float() @ image.float().t()  # [N, N]
    rank = (sims >= sims.diag()[:, None]).sum(dim=1) - 1  # [N] other images scoring at least as high
    return {k: (rank < k).float().mean().item() for k in ks}
