"""Basic Llama building blocks: RMSNorm, a Linear with an optional LoRA adapter, the SwiGLU FFN.

Every module initialises its own parameters in ``__init__`` (so building under ``deepspeed.zero.Init``,
which partitions each module right after its constructor, still initialises correctly). ``init=False``
skips the random initialisation of weights that are about to be overwritten by a checkpoint, which
saves tens of seconds for a 7B model on CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

INIT_STD = 0.02
"""Std of the normal init of linear and embedding weights (Llama-2's initializer_range)."""


@dataclass(frozen=True)
class LoRASpec:
    """LoRA hyper-parameters of one adapter (see ``model.lora`` in the config)."""

    rank: int
    alpha: float
    dropout: float = 0.0


class RMSNorm(nn.Module):
    """Root-mean-square layer norm as in Llama: statistics in fp32, scale applied in the input dtype."""

    def __init__(self, hidden_size: int, *, eps: float = 1e-5, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., D]
        in_dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # Cast back BEFORE scaling, exactly like HF Llama, so bf16 results match bit for bit.
        return self.weight * xf.to(in_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Linear(nn.Module):
    """Bias-free linear layer ``y = x W^T`` with an optional LoRA adapter.

    With LoRA (``lora_rank > 0``): ``y = x W^T + (alpha / r) * dropout(x) A^T B^T`` where
    ``lora_A`` [r, in] is Kaiming-uniform initialised and ``lora_B`` [out, r] starts at zero, so a
    fresh adapter changes nothing. The adapter parameters live on this module (not a wrapper) so the
    base weight keeps its HF name (``...q_proj.weight``) and ZeRO-3 gathers A and B together with W
    when this module runs.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        dtype: torch.dtype | None = None,
        init: bool = True,
        zero_init: bool = False,
        lora: LoRASpec | None = None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype))
        if zero_init:
            nn.init.zeros_(self.weight)
        elif init:
            nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)
        self.lora_rank = 0
        self.lora_scaling = 0.0
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_dropout: nn.Module = nn.Identity()
        if lora is not None:
            # Inside __init__ on purpose: deepspeed.zero.Init partitions the parameters a module owns when
            # its constructor returns; adapters attached later would escape partitioning.
            self.add_lora(rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout)

    def add_lora(self, *, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """Attach a fresh LoRA adapter (B = 0, so outputs are unchanged)."""
        if rank < 1:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        if self.lora_A is not None:
            raise ValueError("this layer already has a LoRA adapter")
        dtype = self.weight.dtype
        self.lora_rank = rank
        self.lora_scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=dtype))
        # Same init as the LoRA paper / peft: A like nn.Linear's default, B zero.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def remove_lora(self) -> None:
        """Drop the adapter (after merging it into ``weight``)."""
        self.lora_A = None
        self.lora_B = None
        self.lora_rank = 0
        self.lora_scaling = 0.0
        self.lora_dropout = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in] -> [..., out]
        y = F.linear(x, self.weight)
        if self.lora_A is not None:
            # [..., in] -> [..., r] -> [..., out]; rank r is tiny so this costs ~2r/out of the main matmul.
            # At decode sizes the cost is the number of ops, not FLOPs: no Identity module call, and the
            # scale rides on the add (one op instead of a mul and an add).
            xd = x if isinstance(self.lora_dropout, nn.Identity) else self.lora_dropout(x)
            y = torch.add(y, F.linear(F.linear(xd, self.lora_A), self.lora_B), alpha=self.lora_scaling)
        return y

    def extra_repr(self) -> str:
        lora = f", lora_rank={self.lora_rank}" if self.lora_rank else ""
        return f"in={self.in_features}, out={self.out_features}{lora}"


class SwiGLU(nn.Module):
    """Llama feed-forward block ``down(silu(gate(x)) * up(x))``; also the shape of every MVM expert."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        dtype: torch.dtype | None = None,
        init: bool = True,
        zero_init_down: bool = False,
        lora: LoRASpec | None = None,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        kw = dict(dtype=dtype, init=init, lora=lora)
        self.gate_proj = Linear(hidden_size, intermediate_size, **kw)
        self.up_proj = Linear(hidden_size, intermediate_size, **kw)
        self.down_proj = Linear(intermediate_size, hidden_size, zero_init=zero_init_down, **kw)

    def projections(self) -> list[Linear]:
        return [self.gate_proj, self.up_proj, self.down_proj]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., D] -> [..., D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
