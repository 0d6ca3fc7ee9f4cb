"""The MKS2 causal LM: Llama decoder (+ MVM / MoME per stage), optional vision prefix and retrieval head.

Module tree (names mirror HF Llama, so HF checkpoints load by name)::

    MKS2ForCausalLM
      model: MKS2Model
        embed_tokens            [V, D]
        layers[i]: DecoderLayer input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm,
                                mlp.{gate,up,down}_proj, [mvm.{gate,up,down}_proj], [router (weight [2, D])]
        norm
      lm_head                   [V, D] (tied to embed_tokens when tie_word_embeddings)
      vision                    VisionFrontEnd (frozen towers + trainable ``mapping``), if model.vision.kind != none
      retrieval                 RetrievalHead (``proj``, ``logit_scale``), stage ``mvm`` with vision only

Pipeline split (the layer list, its key map and stage split: ``mks2.model.pipeline_layout``; the
LayerSpecs are built in ``mks2.training.pipeline``; everything a pipeline layer needs is reusable):

1. embedding stage: :func:`embed_inputs` (token embedding + image-prefix splice) and
   :func:`prepare_positions` -> ``(hidden [B, S, D], position_ids [B, S], segment_ids [B, S])``;
2. one stage entry per decoder layer: ``DecoderLayer(model_cfg, i)`` whose
   ``forward(hidden, position_ids, segment_ids)`` builds its own attention context and returns
   ``(hidden, gates or None)``;
3. head stage: ``RMSNorm`` + ``lm_head`` then :func:`causal_lm_loss` (logits, labels, segment_ids).

The fused forward below does exactly 1 -> 2 -> 3 but builds the attention context (cos/sin, mask
or flash-attn unpadding plan) once for all layers.

Generation: ``forward(new_ids, attention_mask=mask over all tokens so far, past_key_values=cache)``
runs only the new tokens, attending over the cache (any transformers ``Cache``, see
``mks2.model.attention.KVCache``); image prefixes are spliced at prefill, when their placeholders are
among the new tokens. Positions count the real tokens of a left-padded row, as without the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mks2.config.schema import ModelConfig, Stage, VisionKind
from mks2.constants import IGNORE_INDEX
from mks2.model.attention import AttentionContext, KVCache, build_attention_context, build_cached_attention_context
from mks2.model.decoder import DecoderLayer, rotary_from_config
from mks2.model.dtypes import torch_dtype
from mks2.model.layers import INIT_STD, Linear, RMSNorm
from mks2.model.mome import MoMERouter


class MKS2Output(dict):
    """Result of :meth:`MKS2ForCausalLM.forward`, read as attributes (``out.logits``) or keys.

    loss: mean next-token cross-entropy over label positions != -100 (None without labels).
    logits: [B, S, V] (None when ``return_logits=False`` and no labels).
    hidden_states: final-RMSNorm output [B, S, D].
    aux: ``gates`` {layer index: [B, S, E] fp32} for MoME layers, ``num_loss_tokens`` (0-d tensor).

    A dict (as HF's ``ModelOutput``) because ZeRO-3's module hooks find the tensors of tuples, lists and
    dicts only: they replace each value in place, which the attributes then read.
    """

    def __init__(
        self,
        loss: torch.Tensor | None,
        logits: torch.Tensor | None,
        hidden_states: torch.Tensor,
        aux: dict[str, Any] | None = None,
    ):
        super().__init__(loss=loss, logits=logits, hidden_states=hidden_states, aux={} if aux is None else aux)

    @property
    def loss(self) -> torch.Tensor | None:
        return self["loss"]

    @property
    def logits(self) -> torch.Tensor | None:
        return self["logits"]

    @property
    def hidden_states(self) -> torch.Tensor:
        return self["hidden_states"]

    @property
    def aux(self) -> dict[str, Any]:
        return self["aux"]


class Embedding(nn.Module):
    """Token embedding table [V, D] (own class so random init can be skipped before loading)."""

    def __init__(self, num_embeddings: int, dim: int, *, dtype: torch.dtype | None = None, init: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim, dtype=dtype))
        if init:
            nn.init.normal_(self.weight, mean=0.0, std=INIT_STD)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [B, S] -> [B, S, D]
        return F.embedding(ids, self.weight)


class MKS2Model(nn.Module):
    """Decoder stack without the LM head (HF's ``LlamaModel``)."""

    def __init__(self, model_cfg: ModelConfig, *, init: bool = True):
        super().__init__()
        m = model_cfg
        self.embed_tokens = Embedding(m.vocab_size, m.hidden_size, dtype=torch_dtype(m.dtype), init=init)
        self.rotary_emb = rotary_from_config(m)
        self.layers = nn.ModuleList(DecoderLayer(m, i, rotary=self.rotary_emb, init=init) for i in range(m.num_layers))
        self.norm = RMSNorm(m.hidden_size, eps=m.rms_norm_eps, dtype=torch_dtype(m.dtype))


# --------------------------------------------------------------------------------------------
# Reusable pieces (also the pipeline stages' building blocks)
# --------------------------------------------------------------------------------------------


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids [B, S] restarting at 0 at every segment start (padding, segment 0, gets 0)."""
    b, s = segment_ids.shape
    idx = torch.arange(s, device=segment_ids.device).expand(b, s)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_pos = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values  # [B, S]
    return (idx - start_pos).masked_fill(segment_ids == 0, 0)


def prepare_positions(
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Normalise the layout inputs to ``(position_ids [B, S], segment_ids [B, S] or None)``.

    ``attention_mask`` (HF padding mask) and ``segment_ids`` may both be given: a token is real only
    if both say so. ``None`` segment ids mean one unpadded sequence per row (fast causal path).
    """
    b, s = input_ids.shape
    seg = None
    if segment_ids is not None:
        if segment_ids.shape != (b, s):
            raise ValueError(f"segment_ids: expected shape {(b, s)}, got {tuple(segment_ids.shape)}")
        seg = segment_ids.long()
    if attention_mask is not None:
        if attention_mask.shape != (b, s):
            raise ValueError(f"attention_mask: expected shape {(b, s)}, got {tuple(attention_mask.shape)}")
        real = attention_mask.long() != 0
        seg = real.long() if seg is None else seg * real
    if position_ids is None:
        if seg is None:
            position_ids = torch.arange(s, device=input_ids.device).expand(b, s)
        else:
            position_ids = positions_from_segments(seg)
    elif position_ids.shape != (b, s):
        raise ValueError(f"position_ids: expected shape {(b, s)}, got {tuple(position_ids.shape)}")
    return position_ids, seg


def cached_positions(
    input_ids: torch.Tensor, cache: KVCache, attention_mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Position ids [B, q] of q new tokens after the cached ones, and the key mask [B, past + q] bool.

    A real token's position is the number of real tokens before it (``prepare_positions``' rule for one
    segment per row: left padding shifts nothing); padding gets 0."""
    b, q = input_ids.shape
    past = cache.get_seq_length()
    if attention_mask is None:
        return torch.arange(past, past + q, device=input_ids.device).expand(b, q), None
    if attention_mask.shape != (b, past + q):
        raise ValueError(
            f"attention_mask: expected shape {(b, past + q)} (cached {past} + new {q} tokens), "
            f"got {tuple(attention_mask.shape)}"
        )
    key_mask = attention_mask != 0
    positions = (key_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]  # [B, q]
    return positions, key_mask


def embed_inputs(
    input_ids: torch.Tensor,
    *,
    embed_tokens: nn.Module,
    vocab_size: int,
    image_token_id: int,
    vision: nn.Module | None = None,
    pixel_values: torch.Tensor | None = None,
    vision_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Token embeddings [B, S, D] with the image prefixes spliced at the placeholder positions.

    The k-th placeholder position (row-major over [B, S]) gets prefix token ``k % P`` of image
    ``k // P``. Placeholder ids are negative, so they are replaced before the lookup.
    """
    is_img = input_ids == image_token_id  # [B, S]
    bad = ((input_ids < 0) & ~is_img) | (input_ids >= vocab_size)
    n_img, n_bad = (int(x) for x in torch.stack([is_img.sum(), bad.sum()]).tolist())  # one host sync
    if n_bad:
        first = input_ids[bad][0].item()
        raise ValueError(
            f"input_ids: {n_bad} token id(s) outside the vocabulary [0, {vocab_size}) that are not the image "
            f"placeholder {image_token_id} (first: {first})"
        )
    prefix = None
    if pixel_values is not None or vision_features is not None:
        if vision is None:
            raise ValueError("pixel_values/vision_features given but this model has no vision front-end "
                             "(model.vision.kind=none)")  # fmt: skip
        prefix = vision(pixel_values=pixel_values, vision_features=vision_features)  # [N, P, D]
    elif vision is not None:
        # No image in this micro-batch: still run the trainable mapping (on zero images) so that under
        # ZeRO-3 every rank gathers the same partitioned parameters and gets a (zero) gradient for them.
        empty = torch.zeros(0, vision.num_prefix_tokens, vision.feature_dim, device=input_ids.device)
        prefix = vision(vision_features=empty)
    expected = 0 if prefix is None else prefix.shape[0] * prefix.shape[1]
    if n_img != expected:
        n, p = (0, 0) if prefix is None else prefix.shape[:2]
        raise ValueError(
            f"input_ids hold {n_img} image placeholder token(s) (id {image_token_id}) but the batch has "
            f"{n} image(s) x {p} prefix tokens = {expected}; the collator must expand each placeholder "
            "to the vision prefix length"
        )
    embeds = embed_tokens(input_ids.masked_fill(is_img, 0))  # [B, S, D]
    if prefix is not None:
        embeds = embeds.masked_scatter(is_img[..., None], prefix.to(embeds.dtype))
    return embeds


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy (fp32) and the number of predicted tokens.

    ``labels`` [B, S] are aligned with the inputs (HF convention): position t predicts labels[t+1].
    With ``segment_ids`` a position never predicts the first token of the next packed document.
    """
    target = labels[:, 1:]  # [B, S-1]
    if segment_ids is not None:
        same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)
        target = target.masked_fill(~same_doc, IGNORE_INDEX)
    pred = logits[:, :-1].float()  # [B, S-1, V]
    total = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX,
                            reduction="sum")  # fmt: skip
    count = (target != IGNORE_INDEX).sum()
    return total / count.clamp(min=1), count


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class MKS2ForCausalLM(nn.Module):
    """MKS2 Llama causal LM (see module docstring). Build it with :func:`mks2.model.build_model`."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        *,
        init: bool = True,
        load_vision_weights: bool = True,
        weight_gather: Any = None,
        read_vision_weights: bool = True,
        vision_towers: bool = True,
    ):
        super().__init__()
        m = model_cfg
        self.config = m
        self.stage = Stage(m.stage)
        self.vocab_size = m.vocab_size
        self.image_token_id = int(m.vision.image_token_id)
        self.tie_word_embeddings = bool(m.tie_word_embeddings)
        self.gradient_checkpointing = False
        self.model = MKS2Model(m, init=init)
        self.lm_head = Linear(m.hidden_size, m.vocab_size, dtype=torch_dtype(m.dtype), init=init)
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.vision: nn.Module | None = None
        self.retrieval: nn.Module | None = None
        if VisionKind(m.vision.kind) != VisionKind.NONE:
            from mks2.model.vision import VisionFrontEnd

            self.vision = VisionFrontEnd(
                m,
                load_weights=load_vision_weights,
                weight_gather=weight_gather,
                read_weights=read_vision_weights,
                towers=vision_towers,
            )
            if self.stage == Stage.MVM:
                from mks2.model.retrieval import RetrievalHead

                self.retrieval = RetrievalHead(m.hidden_size, self.vision.embed_dim)

    # ---- helpers ------------------------------------------------------------------------------

    def routers(self) -> Iterator[MoMERouter]:
        for layer in self.model.layers:
            if hasattr(layer, "router"):
                yield layer.router

    def force_gates(self, gates: Sequence[float] | None) -> None:
        """Fix every MoME router's gates (e.g. ``[1, 0]``: MLP expert only); None restores routing."""
        routers = list(self.routers())
        if not routers and gates is not None:
            raise ValueError(f"force_gates: this {self.stage.value} model has no MoME router")
        for router in routers:
            router.force_gates(gates)

    @contextlib.contextmanager
    def forced_gates(self, gates: Sequence[float]):
        """Context manager form of :meth:`force_gates`."""
        self.force_gates(gates)
        try:
            yield self
        finally:
            self.force_gates(None)

    def set_activation_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each decoder layer in backward (torch non-reentrant checkpointing)."""
        self.gradient_checkpointing = enabled

    # ---- forward ------------------------------------------------------------------------------

    def embed(self, input_ids, pixel_values=None, vision_features=None) -> torch.Tensor:
        return embed_inputs(
            input_ids,
            embed_tokens=self.model.embed_tokens,
            vocab_size=self.vocab_size,
            image_token_id=self.image_token_id,
            vision=self.vision,
            pixel_values=pixel_values,
            vision_features=vision_features,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        *,
        return_logits: bool = True,
        past_key_values: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> MKS2Output:
        """See the batch contract: input_ids [B, S]; attention_mask (0/1) and/or segment_ids (0 = pad,
        k = k-th packed document) [B, S]; labels [B, S] (-100 ignored, the model shifts);
        pixel_values [N, 3, H, W] or vision_features [N, P, F] for the N images of the batch.
        ``return_logits=False`` skips the vocabulary projection (e.g. the stage-1 retrieval pass).
        ``past_key_values``: a key/value cache (generation, see module docstring; extended in place),
        then ``attention_mask`` covers the cached tokens too. ``logits_to_keep`` > 0: logits of the last
        that many positions only (generation needs one)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected [B, S], got shape {tuple(input_ids.shape)}")
        hidden = self.embed(input_ids, pixel_values, vision_features)  # [B, S, D]
        if past_key_values is not None:
            ctx, position_ids = self._cached_context(input_ids, hidden, attention_mask, position_ids, segment_ids,
                                                     past_key_values)  # fmt: skip
        else:
            position_ids, segment_ids = prepare_positions(
                input_ids, attention_mask=attention_mask, segment_ids=segment_ids, position_ids=position_ids
            )
            ctx = build_attention_context(
                position_ids=position_ids,
                segment_ids=segment_ids,
                rotary=self.model.rotary_emb,
                dtype=hidden.dtype,
                backend=getattr(self.config.attention, "value", self.config.attention),
            )
        gates: dict[int, torch.Tensor] = {}
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                hidden, g = checkpoint(layer, hidden, position_ids, segment_ids, ctx, use_reentrant=False)
            else:
                hidden, g = layer(hidden, position_ids, segment_ids, ctx)
            if g is not None:
                gates[layer.layer_idx] = g
        hidden = self.model.norm(hidden)  # [B, S, D]

        logits = loss = None
        aux: dict[str, Any] = {}
        if gates:
            aux["gates"] = gates
        if labels is not None:
            logits = self.lm_head(hidden)  # [B, S, V]
        elif return_logits:
            logits = self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)  # [B, S or k, V]
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels: expected shape {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
            loss, aux["num_loss_tokens"] = causal_lm_loss(logits, labels, segment_ids)
        return MKS2Output(loss=loss, logits=logits, hidden_states=hidden, aux=aux)

    def _cached_context(
        self,
        input_ids: torch.Tensor,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        cache: KVCache,
    ) -> tuple[AttentionContext, torch.Tensor]:
        if segment_ids is not None:
            raise ValueError("segment_ids (packed rows) cannot be combined with past_key_values (generation)")
        positions, key_mask = cached_positions(input_ids, cache, attention_mask)
        if position_ids is not None:
            if position_ids.shape != input_ids.shape:
                raise ValueError(f"position_ids: expected shape {tuple(input_ids.shape)}, "
                                 f"got {tuple(position_ids.shape)}")  # fmt: skip
            positions = position_ids
        ctx = build_cached_attention_context(
            position_ids=positions,
            key_mask=key_mask,
            cache=cache,
            rotary=self.model.rotary_emb,
            dtype=hidden.dtype,
            backend=getattr(self.config.attention, "value", self.config.attention),
        )
        return ctx, positions

    # ---- stage-1 retrieval ----------------------------------------------------------------------

    def encode_text_for_retrieval(self, hidden_states: torch.Tensor, eos_index: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states [B, S, D] at ``eos_index`` [B] -> [B, vision_dim], L2-normalised."""
        if self.retrieval is None:
            raise ValueError(f"this {self.stage.value} model has no retrieval head (stage 'mvm' with vision only)")
        return self.retrieval.encode_text(hidden_states, eos_index)

    def encode_image_for_retrieval(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Frozen vision encoder's pooled CLS output of images [B, 3, H, W] -> [B, vision_dim], L2-normalised."""
        if self.vision is None or self.retrieval is None:
            raise ValueError(f"this {self.stage.value} model has no retrieval head (stage 'mvm' with vision only)")
        return self.retrieval.encode_image(self.vision.pooled(pixel_values))
