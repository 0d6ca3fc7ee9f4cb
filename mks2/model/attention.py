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

Generation with a key/value cache (:func:`build_cached_attention_context`): the queries are the q new
tokens of each row, the keys every token so far (past + q); ``key_mask`` [B, past + q] marks the
real tokens (HF's 2-D ``attention_mask``, left padding). The cache is any object with
transformers' ``Cache`` interface (``update(k, v, layer_idx)``, ``get_seq_length()``), e.g.
``transformers.DynamicCache``; this module never imports transformers.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mks2.model.layers import Linear, LoRASpec
from mks2.model.rope import RotaryEmbedding, apply_rotary

BACKENDS = ("auto", "flash", "sdpa", "eager")
log = logging.getLogger("mks2.model")


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
    """Pick the concrete kernel for ``model.attention`` (auto -> flash on CUDA fp16/bf16 if importable).
    The first time a choice is made in a process it is logged (``mks2.model``): which kernel and why."""
    kind = _resolve_backend(getattr(requested, "value", requested), device, dtype)
    _log_backend_once(getattr(requested, "value", requested), kind, device.type, str(dtype).replace("torch.", ""))
    return kind


@functools.cache
def _log_backend_once(requested: str, kind: str, device: str, dtype: str) -> None:
    if kind == "flash":
        what = "flash-attn (flash_attn_func; flash_attn_varlen_func for padded or packed rows)"
    elif kind == "sdpa" and requested == "auto":
        why = "flash-attn not importable" if device == "cuda" and not flash_available() else f"{device} {dtype}"
        what = f"PyTorch SDPA (fallback: {why})"
    else:
        what = {"sdpa": "PyTorch SDPA", "eager": "eager softmax(QK^T)V (debugging; slow)"}[kind]
    log.info("attention backend: %s [model.attention=%s, %s %s]", what, requested, device, dtype)


def _resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
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


class KVCache(Protocol):
    """What attention needs of a key/value cache (transformers' ``Cache``/``DynamicCache`` satisfy it)."""

    def get_seq_length(self, layer_idx: int = 0) -> int: ...

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k/v [B, Hkv, q, hd] of layer ``layer_idx``; return all of them [B, Hkv, past + q, hd]."""
        ...


@dataclass
class AttentionContext:
    """Per-forward attention inputs shared by every layer."""

    backend: str  # flash | sdpa | eager
    cos: torch.Tensor  # [B, S, hd] in the activation dtype (S = the query tokens)
    sin: torch.Tensor  # [B, S, hd]
    mask: torch.Tensor | None = None  # [B, 1, S, K] bool, True = may attend; None = no mask (see causal)
    varlen: VarlenLayout | None = None  # flash with padding/packing
    # Without a mask: whether the queries are causal among themselves (False: q = 1 new token that sees
    # every cached key). Flash aligns its causal mask bottom-right, so q new tokens over K keys work too.
    causal: bool = True
    cache: KVCache | None = None  # generation: keys/values of the earlier tokens, extended by every layer


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


def _tensor_key(t: torch.Tensor | None) -> tuple | None:
    """What identifies ``t``'s elements as they are now: the tensor itself (held, so its storage cannot be
    freed and reused by another tensor while a cache entry lives) and its version counter at this moment
    (an in-place change bumps it; ``detach()`` copies, as activation checkpointing makes, share it)."""
    return None if t is None else (t, t._version)


def _same_tensor(key: tuple | None, b: torch.Tensor | None) -> bool:
    """Whether ``b`` is the tensor of ``key`` or a view of the very same elements, unmodified since."""
    if key is None or b is None:
        return key is None and b is None
    a, version = key
    return (
        a.device == b.device
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and b._version == version
    )


class _ContextCache:
    """The last attention context built by layers that get no context from their caller (pipeline-parallel
    decoder layers receive only tensors): every layer of a stage sees the same position/segment ids in a
    micro-batch, so the rope tables, the mask or flash's unpadding plan and their host syncs are built once
    per micro-batch instead of once per layer. One entry: a new micro-batch replaces it."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.ctx: AttentionContext | None = None
        self.builds = 0  # contexts built (the tests count them)

    def get(self, position_ids, segment_ids, rotary, dtype, backend) -> AttentionContext:
        key = self.key
        if (
            key is not None
            and key[2] is rotary
            and key[3] == (dtype, backend)
            and _same_tensor(key[0], position_ids)
            and _same_tensor(key[1], segment_ids)
        ):
            return self.ctx  # type: ignore[return-value]
        ctx = build_attention_context(
            position_ids=position_ids, segment_ids=segment_ids, rotary=rotary, dtype=dtype, backend=backend
        )
        self.key, self.ctx = (_tensor_key(position_ids), _tensor_key(segment_ids), rotary, (dtype, backend)), ctx
        self.builds += 1
        return ctx


CONTEXT_CACHE = _ContextCache()


def cached_attention_context(
    *,
    position_ids: torch.Tensor,
    segment_ids: torch.Tensor | None,
    rotary: RotaryEmbedding,
    dtype: torch.dtype,
    backend: str = "auto",
) -> AttentionContext:
    """``build_attention_context`` for the same ids as the previous call (same elements, unmodified)
    returns the previous context: once per micro-batch for all the layers of a pipeline stage."""
    return CONTEXT_CACHE.get(position_ids, segment_ids, rotary, dtype, getattr(backend, "value", backend))


def cached_mask(key_mask: torch.Tensor, past: int) -> torch.Tensor:
    """Mask [B, 1, q, past + q] (True = may attend) of q new tokens over all keys from ``key_mask``
    [B, past + q] (True = real token). Same rule as :func:`segment_mask` for one segment per row: a
    real query sees the real keys up to itself; a padding query sees only itself (finite softmax)."""
    total = key_mask.shape[1]
    q = total - past
    key_pos = torch.arange(total, device=key_mask.device)
    query_pos = key_pos[past:]
    causal = key_pos[None, :] <= query_pos[:, None]  # [q, K]
    eye = key_pos[None, :] == query_pos[:, None]  # [q, K]
    real_q = key_mask[:, past:, None]  # [B, q, 1]
    allowed = causal[None] & key_mask[:, None, :] & real_q  # [B, q, K]
    assert allowed.shape[1] == q
    return (allowed | eye[None])[:, None]


def build_cached_attention_context(
    *,
    position_ids: torch.Tensor,
    key_mask: torch.Tensor | None,
    cache: KVCache,
    rotary: RotaryEmbedding,
    dtype: torch.dtype,
    backend: str = "auto",
) -> AttentionContext:
    """Context for q new tokens per row (``position_ids`` [B, q]) over ``cache`` (past tokens) and
    themselves; ``key_mask`` [B, past + q] bool (True = real) or None (no padding).

    Without padding the mask is skipped (one new token sees every key; a prefill is plain causal);
    with padding it is :func:`cached_mask` and flash falls back to SDPA (no varlen plan over a cache).
    """
    kind = resolve_backend(backend, position_ids.device, dtype)
    cos, sin = rotary(position_ids, dtype)
    past, q = cache.get_seq_length(), position_ids.shape[1]
    if key_mask is not None and bool(key_mask.all()):
        key_mask = None
    ctx = AttentionContext(backend=kind, cos=cos, sin=sin, cache=cache, causal=q > 1)
    if key_mask is None and kind != "eager" and (q == 1 or past == 0):
        return ctx
    if key_mask is None:
        key_mask = torch.ones(position_ids.shape[0], past + q, dtype=torch.bool, device=position_ids.device)
    ctx.mask = cached_mask(key_mask, past)
    if kind == "flash":
        ctx.backend = "sdpa"
    return ctx


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, Hkv, S, hd] -> [B, Hkv*groups, S, hd] (each kv head serves `groups` query heads)."""
    if groups == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)


def attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    """q [B, S, H, hd], k/v [B, K, Hkv, hd] -> [B, S, H, hd], causal within segments (K = S without a
    cache; K = past + S with one)."""
    b, s, h, d = q.shape
    groups = h // k.shape[2]
    if ctx.backend == "flash":
        flash_func, flash_varlen = _flash_attn()
        if ctx.varlen is None:
            return flash_func(q, k, v, causal=ctx.causal)
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
                qt, kt, vt, attn_mask=ctx.mask, is_causal=ctx.mask is None and ctx.causal, enable_gqa=groups > 1
            )
        else:  # older torch: materialise the repeated kv heads
            kt, vt = _repeat_kv(kt, groups), _repeat_kv(vt, groups)
            causal = ctx.mask is None and ctx.causal
            out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=ctx.mask, is_causal=causal)
        return out.transpose(1, 2)

    assert ctx.backend == "eager" and ctx.mask is not None, ctx.backend
    kt, vt = _repeat_kv(kt, groups), _repeat_kv(vt, groups)
    scores = (qt.float() @ kt.float().transpose(-1, -2)) * d**-0.5  # [B, H, S, K] fp32
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
        layer_idx: int = 0,
    ):
        """``lora`` maps projection names (q_proj, k_proj, v_proj, o_proj) to the adapter they get;
        ``layer_idx`` is this layer's slot in a key/value cache."""
        super().__init__()
        self.layer_idx = layer_idx
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
        if ctx.cache is not None:  # generation: attend over the cached tokens too
            kt, vt = ctx.cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)  # [B, Hkv, K, hd]
            k, v = kt.transpose(1, 2), vt.transpose(1, 2)  # [B, K, Hkv, hd] views, no copy
        out = attention_kernel(q, k, v, ctx)  # [B, S, H, hd]
        return self.o_proj(out.reshape(b, s, self.num_heads * self.head_dim))
