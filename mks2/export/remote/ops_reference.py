"""Stand-in for ``mks2.ops`` inside exported models: the soft-MoME mixing in plain PyTorch.

An exported model must not need the ``mks2_kernels`` package (its Triton/CUDA kernels and custom-op
registration). This module offers the same ``mome_mix`` call, computed by the kernels' own pure-PyTorch
reference (``mks2_kernels.reference.forward``, bundled verbatim), which is also what the package runs
on CPU; autograd differentiates it like any PyTorch code. ``backend`` is accepted and ignored.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from mks2_kernels.reference import forward as _reference_forward


def mome_mix(
    x: torch.Tensor,
    router_weight: torch.Tensor,
    expert_outputs: torch.Tensor,
    backend: str = "auto",
    *,
    return_gates: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [..., d], router_weight [E, d], expert_outputs [E, ..., d] -> [..., d] (gates [..., E] fp32)."""
    d, e = x.shape[-1], expert_outputs.shape[0]
    out, gates = _reference_forward(x.reshape(-1, d), router_weight, expert_outputs.reshape(e, -1, d))
    out = out.reshape(x.shape)
    if return_gates:
        return out, gates.detach().reshape(*x.shape[:-1], e)
    return out


ops = SimpleNamespace(mome_mix=mome_mix)
"""What ``from mks2 import ops`` resolves to in an exported model."""
