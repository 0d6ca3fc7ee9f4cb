"""Stand-in for ``mks2.ops`` inside exported models: the soft-MoME mixing in plain PyTorch.

An exported model must not need the ``mks2_kernels`` package (its Triton/CUDA kernels and custom-op
registration). This module offers the same ``mome_mix`` call, computed by the kernels' own pure-PyTorch
reference (``mks2_kernels.reference.forward``, bundled verbatim), which is also what the package runs
on CPU; autograd differentiates it like any PyTorch code. Without autograd (``generate()``) the same
formula runs in fewer ops (``_mix_inference``). ``backend`` is accepted and ignored.
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
    if not torch.is_grad_enabled():  # generation: the same formula in fewer ops (see _mix_inference)
        out, gates = _mix_inference(x, router_weight, expert_outputs)
        return (out, gates) if return_gates else out
    out, gates = _reference_forward(x.reshape(-1, d), router_weight, expert_outputs.reshape(e, -1, d))
    out = out.reshape(x.shape)
    if return_gates:
        return out, gates.detach().reshape(*x.shape[:-1], e)
    return out


def _mix_inference(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d], w [E, d], y [E, ..., d] -> (out [..., d] in x's dtype, gates [..., E] fp32), no autograd.

    The reference's formula (fp32 gates, fp32 accumulation) without its reshapes, transposes and einsum:
    a decode step mixes a handful of tokens, so its cost is the number of ops (one linear, one softmax,
    one multiply-add per expert), not FLOPs. Equal to the reference within fp32 rounding (tested)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gates = torch.softmax(torch.nn.functional.linear(x.to(acc), w.to(acc)), dim=-1)  # [..., E]
    out = y[0].to(acc) * gates[..., :1]
    for k in range(1, y.shape[0]):
        out = torch.addcmul(out, y[k].to(acc), gates[..., k : k + 1])
    return out.to(x.dtype), gates


ops = SimpleNamespace(mome_mix=mome_mix)
"""What ``from mks2 import ops`` resolves to in an exported model."""
