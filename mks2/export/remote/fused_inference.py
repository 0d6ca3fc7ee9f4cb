"""Fused inference for exported models: fewer, larger matmuls per decoder layer when nothing needs autograd.

A decode step of a small model costs the number of ops it runs, not its FLOPs. Without autograd
(``generate()``, ``torch.no_grad()``), in eval mode, with fp32/fp64 weights, each decoder layer runs:

- attention: q, k and v as one projection ``[(H + 2 Hkv) hd, D]``, split afterwards;
- feed-forward: the gate and up projections of every expert (the MLP and/or the MVM) plus the MoME
  router in one ``[2G + E, D]`` matmul (G = the experts' intermediate sizes summed), and all the down
  projections in one ``[D, G]``: with gates g_e the mixture ``sum_e g_e down_e(h_e)`` equals
  ``down_cat(cat_e(g_e h_e))``, one matmul instead of E matmuls and the mixing (MVM placement
  ``parallel``: the plain sum, g = 1; one expert: itself);
- LoRA adapters folded into their weights, ``W + (alpha / r) B A`` in fp32 as ``merge_lora`` computes it.

The same formulas as the package's modules, so outputs agree within fp32 rounding (tests compare
logits with the training model). The saved weights, the adapters and ``state_dict`` are untouched: the
fused matrices are a derived copy (memory: about one more copy of the layers' projection weights),
built on the first such forward and rebuilt when a weight is replaced, moved, cast or updated in
place through the parameter (``param.data`` writes are invisible: call ``set_fused_inference`` again).
Everything else (autograd, training mode, bf16/fp16, forced gates, forward hooks on a projection or an
expert, a projection replaced by another module type, e.g. peft's) runs the package's own code.

Those checks cost more than a tiny model's decode step gains (a few hundred microseconds for ~30
weights per layer), so they run when a sequence starts; the decode steps over a key/value cache
(inside ``reuse_checked_plans``, which the exported model's ``forward`` enters for them) reuse the
verdict. A weight changed between two decode steps of one sequence would leave that sequence's cached
keys stale anyway.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mks2.config.schema import MVMPlacement, Stage
from mks2.model.attention import Attention, AttentionContext, attention_kernel
from mks2.model.decoder import DecoderLayer
from mks2.model.layers import Linear, SwiGLU
from mks2.model.rope import apply_rotary

FUSED_DTYPES = (torch.float32, torch.float64)


_STATE = threading.local()  # .reuse: whether the running forward reuses the last verdicts (decode step)


@dataclass
class _Plan:
    """The verdict of a module's last check: the identity of the tensors its fused weights come from
    and those weights (None: the fused path does not apply, the module runs its own forward)."""

    key: tuple | None
    weights: tuple[torch.Tensor, ...] | None


@contextlib.contextmanager
def reuse_checked_plans(enabled: bool = True) -> Iterator[None]:
    """Within: fused modules that were checked before skip their checks (see module docstring)."""
    previous = getattr(_STATE, "reuse", False)
    _STATE.reuse = enabled
    try:
        yield
    finally:
        _STATE.reuse = previous


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference-mode tensor tracks no version (nor can it change outside that mode)
        return -1


def _key(tensors: list[torch.Tensor]) -> tuple:
    return tuple((t.data_ptr(), _version(t), t.dtype, t.device, t.shape) for t in tensors)


def _sources(linears: list[Linear]) -> list[torch.Tensor]:
    """Every tensor an effective weight depends on: W, and A, B of an adapter."""
    out = []
    for lin in linears:
        out.append(lin.weight)
        if lin.lora_A is not None:
            out += [lin.lora_A, lin.lora_B]
    return out


def effective_weight(lin: Linear) -> torch.Tensor:
    """W [out, in] with the adapter folded in (``mks2.model.merge_lora``'s formula), detached."""
    w = lin.weight.detach()
    if lin.lora_A is None:
        return w
    acc = torch.promote_types(w.dtype, torch.float32)
    delta = (lin.lora_B.detach().to(acc) @ lin.lora_A.detach().to(acc)) * lin.lora_scaling  # [out, in]
    return (w.to(acc) + delta).to(w.dtype)


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _usable(owner: nn.Module, modules: list[nn.Module], linears: list[Linear], x: torch.Tensor) -> bool:
    """Whether ``owner`` may run its fused path on input ``x`` (see module docstring; autograd and the
    on/off switch are checked by ``_fused_weights``)."""
    if owner.training:
        return False
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return False
    if any(_hooked(m) or m.training for m in modules):
        return False
    if any(type(lin) is not Linear for lin in linears):  # e.g. a peft layer wrapping ours
        return False
    w = linears[0].weight
    return x.dtype == w.dtype and w.dtype in FUSED_DTYPES and w.device.type != "meta"


def _fused_weights(
    owner: nn.Module, x: torch.Tensor, check: Callable[[torch.Tensor], list[torch.Tensor] | None], build: Callable
) -> tuple[torch.Tensor, ...] | None:
    """``owner``'s fused weights for input ``x``, or None (run the module's own forward).

    ``check(x)`` returns the source tensors when the fused path applies (else None); ``build()`` the
    fused weights from them. Both are skipped inside ``reuse_checked_plans`` once a verdict exists."""
    if torch.is_grad_enabled() or not owner.__dict__.get("fused_inference", False):
        return None
    plan = owner.__dict__.get("_fused_plan")
    if plan is not None and getattr(_STATE, "reuse", False):
        return plan.weights
    sources = check(x)
    if sources is None:
        plan = _Plan(key=None, weights=None)
    else:
        key = _key(sources)
        if plan is None or plan.key != key:
            plan = _Plan(key=key, weights=build())
    owner.__dict__["_fused_plan"] = plan
    return plan.weights


class FusedAttention(Attention):
    """``Attention`` whose no-grad forward runs q/k/v as one matmul (see module docstring)."""

    def _projections(self) -> list[Linear]:
        return [self.q_proj, self.k_proj, self.v_proj, self.o_proj]

    def _check(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        linears = self._projections()
        return _sources(linears) if _usable(self, linears, linears, x) else None

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:  # [B, S, D] -> [B, S, D]
        weights = _fused_weights(self, x, self._check, self._build)
        if weights is None:
            return super().forward(x, ctx)
        qkv_w, o_w = weights
        b, s, _ = x.shape
        hd, kv = self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = F.linear(x, qkv_w).split([self.num_heads * hd, kv, kv], dim=-1)  # [B, S, H*hd | Hkv*hd]
        q = q.view(b, s, self.num_heads, hd)
        k = k.view(b, s, self.num_kv_heads, hd)
        v = v.view(b, s, self.num_kv_heads, hd)
        q, k = apply_rotary(q, ctx.cos, ctx.sin), apply_rotary(k, ctx.cos, ctx.sin)
        if ctx.cache is not None:
            kt, vt = ctx.cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)  # [B, Hkv, K, hd]
            k, v = kt.transpose(1, 2), vt.transpose(1, 2)
        out = attention_kernel(q, k, v, ctx)  # [B, S, H, hd]
        return F.linear(out.reshape(b, s, self.num_heads * hd), o_w)

    def _build(self) -> tuple[torch.Tensor, torch.Tensor]:
        qkv = torch.cat([effective_weight(p) for p in (self.q_proj, self.k_proj, self.v_proj)])  # [(H+2Hkv)hd, D]
        return qkv, effective_weight(self.o_proj)


class FusedDecoderLayer(DecoderLayer):
    """``DecoderLayer`` whose no-grad FFN runs every expert and the router in two matmuls."""

    def _experts(self) -> tuple[list[SwiGLU], nn.Module | None]:
        """The experts ``DecoderLayer.ffn`` runs in this layer and the router mixing them (or None: summed)."""
        if not self.has_mvm:
            return [self.mlp], None
        if self.stage == Stage.MOME:
            return [self.mlp, self.mvm], self.router
        if self.placement == MVMPlacement.REPLACE:
            return [self.mvm], None
        return [self.mlp, self.mvm], None

    def _check(self, u: torch.Tensor) -> list[torch.Tensor] | None:
        experts, router = self._experts()
        linears = [p for e in experts for p in e.projections()]
        modules: list[nn.Module] = [*experts, *linears] + ([router] if router is not None else [])
        if (
            not _usable(self, modules, linears, u)
            or any(type(e) is not SwiGLU for e in experts)
            or (router is not None and (router.forced_gates is not None or router.weight.dtype != u.dtype))
        ):
            return None
        return _sources(linears) + ([router.weight] if router is not None else [])

    def ffn(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        weights = _fused_weights(self, u, self._check, self._build)
        if weights is None:
            return super().ffn(u)
        w_in, w_down, expert_of = weights
        g = w_down.shape[1]
        parts = F.linear(u, w_in).split([g, g, w_in.shape[0] - 2 * g], dim=-1)  # [B, S, G | G | E]
        h = F.silu(parts[0]) * parts[1]  # [B, S, G]: every expert's SwiGLU activations side by side
        gates = None
        if expert_of.numel():  # a router: MoME
            gates = torch.softmax(parts[2], dim=-1)  # [B, S, E], the router's logits came with the matmul
            h = h * gates.index_select(-1, expert_of)  # each activation scaled by its expert's gate
        return F.linear(h, w_down), gates  # [B, S, D]: the down projections and the mixing in one matmul

    def _build(self) -> tuple[torch.Tensor, ...]:
        experts, router = self._experts()
        rows = [effective_weight(e.gate_proj) for e in experts] + [effective_weight(e.up_proj) for e in experts]
        if router is not None:
            rows.append(router.weight.detach())
        w_in = torch.cat(rows)  # [2G (+E), D]
        w_down = torch.cat([effective_weight(e.down_proj) for e in experts], dim=1)  # [D, G]
        expert_of = torch.zeros(0, dtype=torch.long, device=w_in.device)  # no router: experts summed
        if router is not None:
            sizes = torch.tensor([e.intermediate_size for e in experts], device=w_in.device)
            expert_of = torch.repeat_interleave(torch.arange(len(experts), device=w_in.device), sizes)  # [G]
        return w_in, w_down, expert_of


def _layers(core: nn.Module) -> Iterator[DecoderLayer]:
    for layer in core.model.layers:
        if isinstance(layer, DecoderLayer):
            yield layer


def install_fused_inference(core: nn.Module, enabled: bool = True) -> None:
    """Give every decoder layer of ``core`` (an ``MKS2ForCausalLM``) the fused no-grad path; the
    modules keep their parameters and names (only their class gains the fused forward)."""
    for layer in _layers(core):
        if type(layer) is DecoderLayer:
            layer.__class__ = FusedDecoderLayer
        if type(layer.self_attn) is Attention:
            layer.self_attn.__class__ = FusedAttention
    set_fused_inference(core, enabled)


def set_fused_inference(core: nn.Module, enabled: bool) -> None:
    """Turn the fused path on or off; drops the fused weights (rebuilt on the next no-grad forward)."""
    for layer in _layers(core):
        for m in (layer, layer.self_attn):
            m.__dict__["fused_inference"] = bool(enabled)
            m.__dict__.pop("_fused_plan", None)
