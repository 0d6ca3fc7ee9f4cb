"""The FLOPs one training step really runs, derived from the built model.

``flops_model(model, recompute=...)`` walks the modules a forward pass runs, in the order it runs them
(``MKS2ForCausalLM.forward`` -> ``DecoderLayer.forward`` / ``DecoderLayer.ffn``), and reads every
weight's ``requires_grad``; the step's FLOPs are then :meth:`FlopsModel.step_flops` of the step's
:class:`~mks2.training.task.BatchCounts` (real tokens, LM-head, image-prefix and retrieval tokens,
causal attention pairs per segment), summed over the data-parallel ranks and micro-batches.

Counted per matmul weight of N parameters and per token that runs through it:

- forward: 2N;
- weight gradient: 2N if the weight is trainable;
- input gradient: 2N if the gradient must flow further down, i.e. the op's input requires grad (a
  trainable op, or a trainable image mapping, runs before it in the same data path). A frozen op above
  the trainable ones therefore costs 4N, a frozen op below all of them (e.g. the first layers' attention
  when only the MVM of later layers trains and no image mapping feeds the input) 2N, a trainable op 4N
  or 6N;
- activation recompute (``train.activation_checkpointing``): every decoder layer the backward passes
  through runs its forward a second time (+2N per weight, +the attention forward), INCLUDED;
- attention scores and values (no weights): per causal (query, key) pair of a segment
  (``n (n + 1) / 2`` pairs for a segment of n real tokens; attention never crosses segments), forward
  ``4 H d`` (QK^T and PV, H query heads of width d), backward twice that when gradients flow through;
- modules that run on part of the tokens only: the LM head on the tokens whose logits are computed
  (stage 1: the caption view; stage 2: every token), the image mapping on the image-prefix tokens, the
  stage-1 retrieval projection on the tokens it projects (each caption's EOS state);
- padding positions are NOT counted (they are computed, but no useful work: ``padding_fraction`` says
  how much runs on them); embedding lookups, norms, activations, softmax and the MoME mixing are not
  counted (no matmul); the frozen vision towers, which run outside the engine (forward only), are
  EXCLUDED.

Which modules run is decided by the model's own structure: the placement ``replace`` runs the MVM
instead of the frozen MLP in stage 1, ``parallel`` runs both, MoME runs both experts and the router.
``tests/training/test_flops.py`` checks that the modules counted are exactly those whose forward runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from mks2.config import MVMPlacement, Stage

if TYPE_CHECKING:
    from mks2.training.task import BatchCounts


@dataclass(frozen=True)
class FlopsModel:
    """FLOPs coefficients of one built model; multiply by a step's counts (:meth:`step_flops`)."""

    decoder_per_token: float
    """Decoder-layer matmuls of one real token of any view: forward + backward + recompute."""
    attention_per_pair: float
    """One causal (query, key) pair of a segment, over all decoder layers: forward + backward + recompute."""
    lm_head_per_token: float
    """LM head, per token whose logits are computed."""
    mapping_per_token: float
    """Trainable image mapping, per image-prefix token."""
    retrieval_per_token: float
    """Stage-1 retrieval projection, per token it runs on (each caption's EOS state)."""
    recompute: bool
    """Whether activation recompute is counted (``train.activation_checkpointing``)."""

    def step_flops(self, counts: BatchCounts) -> float:
        """FLOPs that ran on the real tokens of ``counts`` (vision towers excluded)."""
        return (
            self.decoder_per_token * counts.tokens
            + self.attention_per_pair * counts.attention_pairs
            + self.lm_head_per_token * counts.head_tokens
            + self.mapping_per_token * counts.image_tokens
            + self.retrieval_per_token * counts.retrieval_tokens
        )


class _Tally:
    """Forward / backward FLOPs per token of one group of ops, accumulated while walking."""

    def __init__(self) -> None:
        self.fwd = 0.0
        self.bwd = 0.0

    def matmul(self, weight: nn.Parameter, grad_in: bool) -> bool:
        """A weight of N parameters applied to one token whose input requires grad iff ``grad_in``;
        returns whether its output requires grad."""
        n = float(getattr(weight, "ds_numel", weight.numel()))  # ZeRO-3 partitioned: the full size
        self.fwd += 2 * n
        if weight.requires_grad:
            self.bwd += 2 * n  # weight gradient
        if grad_in:
            self.bwd += 2 * n  # gradient to the input
        return grad_in or weight.requires_grad


def _trainable_elementwise(module: nn.Module | None) -> bool:
    """A module without matmul FLOPs (norm, bias) whose trainable parameters make its output need grad."""
    return module is not None and any(p.requires_grad for p in module.parameters(recurse=False))


def _linear(t: _Tally, lin: nn.Module, grad_in: bool) -> bool:
    """``mks2.model.layers.Linear`` (base weight + optional LoRA A, B) or ``nn.Linear``."""
    out = t.matmul(lin.weight, grad_in)
    bias = getattr(lin, "bias", None)
    out = out or (bias is not None and bias.requires_grad)
    lora_a, lora_b = getattr(lin, "lora_A", None), getattr(lin, "lora_B", None)
    if lora_a is not None and lora_b is not None:
        mid = t.matmul(lora_a, grad_in)  # [.., in] -> [.., r]
        out = t.matmul(lora_b, mid) or out  # [.., r] -> [.., out]
    return out


def _swiglu(t: _Tally, ffn: nn.Module, grad_in: bool) -> bool:
    gate = _linear(t, ffn.gate_proj, grad_in)
    up = _linear(t, ffn.up_proj, grad_in)
    return _linear(t, ffn.down_proj, gate or up)


def ffn_modules(layer: nn.Module) -> tuple[list[nn.Module], nn.Module | None]:
    """(SwiGLU experts whose forward runs in ``layer.ffn``, the MoME router or None): the same decision
    as ``DecoderLayer.ffn`` makes, read from the same attributes."""
    if not layer.has_mvm:
        return [layer.mlp], None
    if layer.stage == Stage.MOME:
        return [layer.mlp, layer.mvm], layer.router
    if layer.placement == MVMPlacement.REPLACE:
        return [layer.mvm], None  # the frozen MLP does not run
    return [layer.mlp, layer.mvm], None


def _decoder_layer(dense: _Tally, attn: _Tally, layer: nn.Module, grad_in: bool) -> bool:
    """One ``DecoderLayer`` (see its forward): attention block then the stage's FFN part."""
    a = layer.self_attn
    g = grad_in or _trainable_elementwise(layer.input_layernorm)
    q, k, v = (_linear(dense, p, g) for p in (a.q_proj, a.k_proj, a.v_proj))
    core_grad = q or k or v
    width = float(a.num_heads * a.head_dim)
    attn.fwd += 4 * width  # QK^T and PV: 2 H d each per (query, key) pair
    if core_grad:
        attn.bwd += 8 * width  # dQ, dK, dV, dP: twice the forward
    o = _linear(dense, a.o_proj, core_grad)
    h = grad_in or o  # residual x + o_proj(...)
    u = h or _trainable_elementwise(layer.post_attention_layernorm)
    experts, router = ffn_modules(layer)
    out = h
    for expert in experts:
        out = _swiglu(dense, expert, u) or out
    if router is not None:
        out = dense.matmul(router.weight, u) or out  # u [.., D] @ W_r^T [D, E], fp32
    return out


def flops_model(model: nn.Module, *, recompute: bool) -> FlopsModel:
    """FLOPs coefficients of an ``MKS2ForCausalLM`` as built for training (weights frozen or not),
    ``recompute``: whether each decoder layer is recomputed in backward (activation checkpointing).

    Works on a ZeRO-3 partitioned model (reads ``ds_numel``) and before the pipeline split."""
    mapping = _Tally()
    grad = _trainable_elementwise(model.model.embed_tokens)  # a lookup: no matmul, but may train
    vision = getattr(model, "vision", None)
    if vision is not None:
        # The mapping runs on every micro-batch (on zero images when it has none, see embed_inputs), and
        # its output is spliced into the one [B, S, D] tensor that carries every view: if it trains, the
        # gradient flows down through every layer for every row.
        grad = _linear(mapping, vision.mapping, False) or grad
    dense, attn = _Tally(), _Tally()
    recomputed = [0.0, 0.0]  # (dense, attention) forward FLOPs run again in backward
    for layer in model.model.layers:
        before = (dense.fwd, attn.fwd)
        grad = _decoder_layer(dense, attn, layer, grad)
        if recompute and grad:  # backward passes through the layer: its checkpoint re-runs the forward
            recomputed[0] += dense.fwd - before[0]
            recomputed[1] += attn.fwd - before[1]
    grad = grad or _trainable_elementwise(model.model.norm)
    head = _Tally()
    _linear(head, model.lm_head, grad)
    proj = _Tally()
    retrieval = getattr(model, "retrieval", None)
    if retrieval is not None:
        _linear(proj, retrieval.proj, grad)
    return FlopsModel(
        decoder_per_token=dense.fwd + dense.bwd + recomputed[0],
        attention_per_pair=attn.fwd + attn.bwd + recomputed[1],
        lm_head_per_token=head.fwd + head.bwd,
        mapping_per_token=mapping.fwd + mapping.bwd,
        retrieval_per_token=proj.fwd + proj.bwd,
        recompute=recompute,
    )


def describe(fm: FlopsModel) -> str:
    """One line for the start-up summary."""
    return (
        f"FLOPs per real token: decoder {_human(fm.decoder_per_token)}, LM head {_human(fm.lm_head_per_token)}; "
        f"per causal attention pair {_human(fm.attention_per_pair)}; recompute "
        f"{'counted' if fm.recompute else 'off'}; frozen vision towers excluded"
    )


def _human(x: float) -> str:
    for scale, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g}"


def matmul_modules(model: nn.Module) -> list[tuple[str, Any]]:
    """(name, module) of every matmul module :func:`flops_model` counts as running in a training
    forward (the LM head and the retrieval projection included); for the test that compares them
    with the modules whose forward really runs."""
    names = {id(m): n for n, m in model.named_modules()}
    out: list[Any] = []
    vision = getattr(model, "vision", None)
    if vision is not None:
        out.append(vision.mapping)
    for layer in model.model.layers:
        a = layer.self_attn
        out += [a.q_proj, a.k_proj, a.v_proj, a.o_proj]
        experts, router = ffn_modules(layer)
        for expert in experts:
            out += [expert.gate_proj, expert.up_proj, expert.down_proj]
        if router is not None:
            out.append(router)
    out.append(model.lm_head)
    retrieval = getattr(model, "retrieval", None)
    if retrieval is not None:
        out.append(retrieval.proj)
    return [(names[id(m)], m) for m in out]
