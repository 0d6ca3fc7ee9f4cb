"""Pure-PyTorch soft-MoME token mixing: the reference every fused backend is checked against.

Shapes (leading dims already flattened by the caller, ``mks2_kernels.op``):
    x [T, d] hidden states, w [E, d] router weight, y [E, T, d] expert outputs.
    logits = x @ w^T [T, E] in fp32, gates g = softmax(logits) [T, E] in fp32,
    out[t] = sum_e g[t, e] * y[e, t] [T, d] in x's dtype.

The backward is written out in closed form (it is the formula the fused kernels implement):
    dy[e, t]      = g[t, e] * dout[t]
    dg[t, e]      = <dout[t], y[e, t]>
    dlogits[t, e] = g[t, e] * (dg[t, e] - sum_e' g[t, e'] dg[t, e'])
    dx            = dlogits @ w          [T, d]
    dw            = dlogits^T @ x        [E, d]
all accumulated in fp32 and cast to each input's dtype at the end.
"""

from __future__ import annotations

import torch


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs (so gradcheck can run on the reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(out [T, d] in x.dtype, gates [T, E] fp32)`` (fp64 for fp64 inputs)."""
    acc = _acc(x.dtype)
    logits = x.to(acc) @ w.to(acc).t()  # [T, E] fp32: gates are computed in fp32 (DESIGN §1)
    gates = torch.softmax(logits, dim=-1)  # [T, E]
    out = torch.einsum("te,etd->td", gates, y.to(acc))  # [T, d]
    return out.to(x.dtype).contiguous(), gates  # contiguous: the custom op's fake promises it


def backward(
    grad_out: torch.Tensor, x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, gates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(dx [T, d], dw [E, d], dy [E, T, d])`` in the dtypes of x, w, y."""
    acc = _acc(x.dtype)
    go = grad_out.to(acc)  # [T, d]
    gates = gates.to(acc)
    dy = gates.t()[:, :, None] * go[None]  # [E, T, d]
    dg = torch.einsum("td,etd->te", go, y.to(acc))  # [T, E]
    dlogits = gates * (dg - (gates * dg).sum(-1, keepdim=True))  # [T, E]
    dx = dlogits @ w.to(acc)  # [T, d]
    dw = dlogits.t() @ x.to(acc)  # [E, d]
    return dx.to(x.dtype).contiguous(), dw.to(w.dtype).contiguous(), dy.to(y.dtype).contiguous()


def mix_autograd(x: torch.Tensor, router_weight: torch.Tensor, expert_outputs: torch.Tensor) -> torch.Tensor:
    """The op written as plain differentiable PyTorch, any leading dims: the 'eager' baseline.

    x [..., d], router_weight [E, d], expert_outputs [E, ..., d] -> [..., d] in x's dtype. Autograd
    derives the backward; torch.compile of this function is the 'compiled' baseline of the benchmark.
    """
    acc = _acc(x.dtype)
    gates = torch.softmax(x.to(acc) @ router_weight.to(acc).t(), dim=-1)  # [..., E] fp32
    y = expert_outputs.to(acc).movedim(0, -2)  # [..., E, d]
    out = (gates.unsqueeze(-1) * y).sum(-2)  # [..., d]
    return out.to(x.dtype)
