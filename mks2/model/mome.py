"""Soft Mixture of Multimodal Experts router (DESIGN §1, stage ``mome``).

Per token: ``g(u) = softmax(W_r u)`` computed in fp32, output ``sum_e g_e(u) * E_e(u)``. The mixing
goes through ``mks2.ops.mome_mix`` (fused kernels on GPU, torch reference on CPU). The mixing runs
inside this module's ``forward`` on purpose: under ZeRO-3 a parameter is gathered only while its owner
module runs, so a kernel that reads ``W_r`` must be called from the router itself.

This is per-token routing, never Soft-MoE slot mixing across the sequence (that would leak future
tokens in a decoder).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mks2 import ops


class MoMERouter(nn.Module):
    """Router weight ``W_r`` [E, D] plus the mixing of E expert outputs."""

    def __init__(
        self,
        hidden_size: int,
        *,
        num_experts: int = 2,
        init_std: float = 0.0,
        kernel_backend: str = "auto",
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.kernel_backend = getattr(kernel_backend, "value", kernel_backend)
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=dtype))
        if init_std > 0:
            nn.init.normal_(self.weight, mean=0.0, std=init_std)
        # Fixed gates for tests/ablations (a plain attribute: never saved, never cast by .to(dtype)).
        self.forced_gates: torch.Tensor | None = None

    def force_gates(self, gates: Sequence[float] | torch.Tensor | None) -> None:
        """Use constant gates [E] instead of the router (None restores routing)."""
        if gates is None:
            self.forced_gates = None
            return
        g = torch.as_tensor(gates, dtype=torch.float32).flatten()
        if g.numel() != self.num_experts or not torch.isfinite(g).all():
            raise ValueError(f"forced gates must be {self.num_experts} finite numbers, got {list(g.tolist())}")
        self.forced_gates = g

    def gates(self, u: torch.Tensor) -> torch.Tensor:
        """u [..., D] -> gates [..., E] fp32, summing to one per token."""
        if self.forced_gates is not None:
            return self.forced_gates.to(u.device).expand(*u.shape[:-1], self.num_experts)
        return torch.softmax(u.float() @ self.weight.float().t(), dim=-1)

    def forward(self, u: torch.Tensor, expert_outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """u [B, S, D], expert_outputs [E, B, S, D] -> (mixed [B, S, D] in u's dtype, gates [B, S, E] fp32,
        detached)."""
        assert expert_outputs.shape[0] == self.num_experts, expert_outputs.shape
        if self.forced_gates is not None:
            g = self.forced_gates.to(u.device)
            mixed = torch.einsum("e,e...d->...d", g, expert_outputs.float()).to(u.dtype)
            return mixed, self.gates(u)
        # The op hands back the gates it used (detached): diagnostics without recomputing them under
        # autograd, which would keep an fp32 copy of u per layer for the backward.
        mixed, gates = ops.mome_mix(u, self.weight, expert_outputs, backend=self.kernel_backend, return_gates=True)
        return mixed, gates
