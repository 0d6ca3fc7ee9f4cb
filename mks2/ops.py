"""Public ops. ``mome_mix`` is the soft-MoME token mixing (DESIGN §1, issue #5).

Placeholder reference implementation until the fused kernels land; the signature is final.
"""

from __future__ import annotations

import torch


def mome_mix(
    x: torch.Tensor, router_weight: torch.Tensor, expert_outputs: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """Mix expert outputs per token with softmax gates computed in fp32.

    x: [..., d] hidden states; router_weight: [E, d]; expert_outputs: [E, ..., d].
    Returns out [..., d] = sum_e softmax(x @ W_r^T)[..., e] * expert_outputs[e], in x's dtype.
    """
    gates = torch.softmax(x.float() @ router_weight.float().t(), dim=-1)  # [..., E]
    out = torch.einsum("...e,e...d->...d", gates, expert_outputs.float())
    return out.to(x.dtype)
