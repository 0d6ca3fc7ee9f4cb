"""Grouped-query self-attention with three kernels: flash-attn, PyTorch SDPA and an eager reference.

Masking follows the batch contract: ``segment_ids`` [B, S] with 0 = padding and k >= 1 = the k-th
packed document of a row. Token q may attend to token k iff ``k <= q`` and both belong to the same
non-zero segment. Everything that depends only on the batch layout (cos/sin tables, the boolean
mask or flash-attn's unpadding indices) is computed once per forward in an :class:`AttentionContext`
and shared by all layers.

- ``flash``: ``flash_attn_func(causal=True)`` when every token is in segment 1 (no padding, no
  packing), else ``flash_attn_varlen_func`` on the unpadded tokens with one sequence per document
  (no wasted work on padding, no S x S mask). Needs CUDA and fp16/bf16.
- ``sdpa``: ``F.scaled_dot_product_attention`` with ``is_causal=True`` for the trivial layout, else a
  boolean mask [B, 1, S, S]. Padding query rows are allowed to see themselves only, so no row is fully
  masked (a fully masked row gives NaN in SDPA); their outputs are never used.
- ``eager``: explicit fp32 softmax(QK^T / sqrt(d)) V with the same mask, for debugging and tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mks2.model.layers import Linear, LoRASpec
from mks2.model.rope import RotaryEmbedding, apply_rotary

BACKENDS = ("auto", "flash", "sdpa", "eager")


@functools.cache
def _flash_attn():
    """The flash-attn functions, or None when the package is not importable."""
    try:
        from flash_attn import flash_attn_func, flash_attn_varlen_func
    except Exception:  # ImportError, or a broken CUDA build raising at import time
        return None
    return flash_attn_func, flash_attn_varlen_func


# SDPA's native grouped-query support (no repeated kv heads in memory) arrived in torch 2.5.
_SDPA_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def flash_available() -> bool:
    return _flash_attn() is not None


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """Pick the concrete kernel for ``model.attention`` (auto -> flash on CUDA fp16/bf16 if importable)."""
    requested = getattr(requested, "value", requested)
    if requested not in BACKENDS:
        raise ValueError(f"model.attention: unknown backend {requested!r} (allowed: {', '.join(BACKENDS)})")
    flash_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if requested == "auto":
        return "flash" if flash_ok and flash_available() else "sdpa"
    if requested == "flash":
        if not flash_available():
            raise ValueError("model.attention=flash but flash-attn is not importable (pip install flash-attn)")
        if not flash_ok:
            raise ValueError(
                f"model.attention=flash needs CUDA tensors in fp16/bf16, got {device.type} {dtype}; "
                "use model.attention=auto or sdpa"
            )
    return requested


@dataclass
class VarlenLayout:
    """Unpadding plan for flash-attn varlen: real tokens in document order."""

    indices: torch.Tensor  # [T] positions of real tokens in the flattened [B*S]
    cu_seqlens: torch.Tensor  # [docs+1] int32 cumulative document lengths
    max_seqlen: int


@dataclass
class AttentionContext:
    """Per-forward attention inputs shared by every layer."""

    backend: str  # flash | sdpa | eager
    cos: torch.Tensor  # [B, S, hd] in the activation dtype
    sin: torch.Tensor  # [B, S, hd]
    mask: torch.Tensor | None = None  # [B, 1, S, S] bool, True = may attend; None = plain causal
    varlen: VarlenLayout | None = None  # flash with padding/packing


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """Boolean attention mask [B, 1, S, S] (True = may attend) from segment ids [B, S]."""
    s = segment_ids.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=segment_ids.device).tril()  # [S, S]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, S(q), S(k)]
    real_q = (segment_ids > 0)[:, :, None]
    eye = torch.eye(s, dtype=torch.bool, device=segment_ids.device)
    return ((same & real_q & causal) | eye)[:, None]  # pad rows see only themselves (finite softmax)


def varlen_layout(segment_ids: torch.Tensor) -> VarlenLayout:
    """Real tokens and per-document boundaries for flash_attn_varlen_func."""
    b, s = segment_ids.shape
    seg = segment_ids.reshape(-1).long()
    indices = torch.nonzero(seg > 0, as_tuple=False).flatten()  # [T]
    # A document = (row, segment id); documents are contiguous runs, so a key change marks a start.
    row = torch.arange(b, device=seg.device).repeat_interleave(s)
    key = (row * (int(segment_ids.max()) + 1) + seg)[indices]
    starts = torch.ones_like(key, dtype=torch.bool)
    starts[1:] = key[1:] != key[:-1]
    start_idx = torch.nonzero(starts, as_tuple=False).flatten()
    cu = torch.cat([start_idx, torch.tensor([key.numel()], device=seg.device)]).to(torch.int32)
    max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
    return VarlenLayout(indices=indices, cu_seqlens=cu, max_seqlen=max_len)


def build_attention_context(
    *,
    position_ids: torch.Tensor,
    segment_ids: torch.Tensor | None,
    rotary: RotaryEmbedding,
    dtype: torch.dtype,
    backend: str = "auto",
) -> AttentionContext:
    """Everything the layers need besides the hidden states. ``segment_ids`` None = one causal sequence per row.

    Costs one host sync to detect the trivial layout (all tokens in segment 1), which then skips the mask.
    """
    device = position_ids.device
    kind = resolve_backend(backend, device, dtype)
    cos, sin = rotary(position_ids, dtype)
    trivial = segment_ids is None or bool((segment_ids == 1).all())
    ctx = AttentionContext(backend=kind, cos=cos, sin=sin)
    if trivial:
        if kind == "eager":
            ctx.mask = segment_mask(torch.ones_like(position_ids))
        return ctx
    if kind == "flash":
        ctx.varlen = varlen_layout(segment_ids)
    else:
        ctx.mask = segment_mask(segment_ids)
    return ctx


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, hd] -> [B, Hkv*groups, S, hd] (each kv head serves `groups` query heads)."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """q [B, S, H, hd], k/v [B, S, Hkv, hd] -> [B, S, H, hd], causal within segments."""
    b, s, h, d = q.shape
    groups = h // k.shape[2]
    if ctx.backend == "flash":
        flash_func, flash_varlen = _flash_attn()
        if ctx.varlen is None:
            return flash_func(q, k, v, causal=True)
        lay = ctx.varlen
        qf, kf, vf = (t.reshape(b * s, t.shape[2], d).index_select(0, lay.indices) for t in (q, k, v))
        of = flash_varlen(
            qf, kf, vf, cu_seqlens_q=lay.cu_seqlens, cu_seqlens_k=lay.cu_seqlens,
            max_seqlen_q=lay.max_seqlen, max_seqlen_k=lay.max_seqlen, causal=True,
        )  # fmt: skip  # [T, H, hd]
        out = q.new_zeros(b * s, h, d).index_copy(0, lay.indices, of)  # padding positions stay zero
        return out.view(b, s, h, d)

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H(kv), S, hd]
    if ctx.backend == "sdpa":
        if _SDPA_HAS_GQA:
            out = F.scaled_dot_product_attention(
                qt, kt, vt, attn_mask=ctx.mask, is_causal=ctx.mask is None, enable_gqa=groups > 1
            )
        else:  # older torch: materialise the repeated kv heads
            kt, vt = _repeat_kv(kt, groups), _repeat_kv(vt, groups)
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=ctx.mask, is_causal=ctx.mask is None)
        return out.transpose(1, 2)

    assert ctx.backend == "eager" and ctx.mask is not None, ctx.backend
    kt, vt = _repeat_kv(kt, groups), _repeat_kv(vt, groups)
    scores = (qt.float() @ kt.float().transpose(-1, -2)) * d**-0.5  # [B, H, S, S] fp32
    scores = scores.masked_fill(~ctx.mask, float("-inf"))
    probs = scores.softmax(dim=-1).to(vt.dtype)
    return (probs @ vt).transpose(1, 2)


class Attention(nn.Module):
    """Llama self-attention with grouped-query heads (HF names: q_proj, k_proj, v_proj, o_proj)."""

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        rotary: RotaryEmbedding,
        dtype: torch.dtype | None = None,
        init: bool = True,
        lora: dict[str, LoRASpec] | None = None,
    ):
        """``lora`` maps projection names (q_proj, k_proj, v_proj, o_proj) to the adapter they get."""
        super().__init__()
        assert hidden_size % num_heads == 0 and num_heads % num_kv_heads == 0
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = hidden_size // num_heads
        lora = lora or {}
        hd, kv = self.head_dim, num_kv_heads
        self.q_proj = Linear(hidden_size, num_heads * hd, dtype=dtype, init=init, lora=lora.get("q_proj"))
        self.k_proj = Linear(hidden_size, kv * hd, dtype=dtype, init=init, lora=lora.get("k_proj"))
        self.v_proj = Linear(hidden_size, kv * hd, dtype=dtype, init=init, lora=lora.get("v_proj"))
        self.o_proj = Linear(num_heads * hd, hidden_size, dtype=dtype, init=init, lora=lora.get("o_proj"))
        self.rotary_emb = rotary  # parameter-free; shared by every layer of a model

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:  # [B, S, D] -> [B, S, D]
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        out = attention_kernel(q, k, v, ctx)  # [B, S, H, hd]
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))
