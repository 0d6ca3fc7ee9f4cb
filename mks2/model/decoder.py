"""One decoder layer of the MKS2 Llama, for every stage of DESIGN §1.

With ``h = x + Attn(RMSNorm(x))`` and ``u = RMSNorm2(h)`` the layer returns:

| stage / layer kind                      | output                                   |
|-----------------------------------------|------------------------------------------|
| ``base``, or a layer without an MVM     | ``h + MLP(u)`` (MLP with LoRA in ``mome``) |
| ``mvm``, placement ``replace``          | ``h + MVM(u)``                           |
| ``mvm``, placement ``parallel``         | ``h + MLP(u) + MVM(u)``                  |
| ``mome`` (MVM layer, ``use_mvm=true``)  | ``h + sum_e g_e(u) E_e(u)``, E_0 = MLP+LoRA, E_1 = MVM+LoRA |

The layer is self-contained for pipeline parallelism: ``forward(hidden, position_ids, segment_ids)``
builds its own attention context when none is passed (the full model builds it once and shares it).
"""

from __future__ import annotations

import torch
from torch import nn

from mks2.config.schema import ModelConfig, MVMPlacement, Stage, mvm_layers_problem
from mks2.model.attention import Attention, AttentionContext, cached_attention_context
from mks2.model.dtypes import torch_dtype
from mks2.model.layers import LoRASpec, RMSNorm, SwiGLU
from mks2.model.mome import MoMERouter
from mks2.model.rope import RotaryEmbedding

ATTENTION_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def rotary_from_config(m: ModelConfig) -> RotaryEmbedding:
    return RotaryEmbedding(
        head_dim=m.hidden_size // m.num_heads,
        theta=m.rope_theta,
        rope_scaling=m.rope_scaling,
        max_position_embeddings=m.max_position_embeddings,
    )


def mvm_intermediate_size(m: ModelConfig) -> int:
    return m.mvm.intermediate_size or m.intermediate_size


def mvm_layer_indices(layers: str | list[int], num_layers: int) -> list[int]:
    """Resolve ``model.mvm.layers`` (``all``, ``every:K`` or a list of indices) to sorted layer indices;
    raises ValueError with the reason when the selection is invalid."""
    problem = mvm_layers_problem(layers, num_layers)
    if problem:
        raise ValueError(problem)
    if isinstance(layers, str):
        step = 1 if layers == "all" else int(layers.split(":", 1)[1])
        return list(range(0, num_layers, step))
    return sorted(int(i) for i in layers)


def layer_has_mvm(m: ModelConfig, layer_idx: int) -> bool:
    """Whether layer ``layer_idx`` carries an MVM expert in this config's stage."""
    stage = Stage(m.stage)
    if stage == Stage.BASE or (stage == Stage.MOME and not m.mome.use_mvm):
        return False
    return layer_idx in mvm_layer_indices(m.mvm.layers, m.num_layers)


class DecoderLayer(nn.Module):
    """Pre-norm Llama layer with the stage-specific FFN part (see module docstring)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        layer_idx: int,
        *,
        rotary: RotaryEmbedding | None = None,
        init: bool = True,
    ):
        """``init=False`` skips random init of the weights an HF checkpoint will overwrite (attention,
        MLP, norms stay ones); MVM, router and LoRA are always initialised."""
        super().__init__()
        m = model_cfg
        self.layer_idx = layer_idx
        self.stage = Stage(m.stage)
        self.placement = MVMPlacement(m.mvm.placement)
        self.attention_backend = getattr(m.attention, "value", m.attention)
        dtype = torch_dtype(m.dtype)
        d, inter = m.hidden_size, m.intermediate_size
        lora = None
        targets: set[str] = set()
        if self.stage == Stage.MOME:
            lora = LoRASpec(rank=m.lora.rank, alpha=m.lora.alpha, dropout=m.lora.dropout)
            targets = set(m.lora.targets)

        self.input_layernorm = RMSNorm(d, eps=m.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(
            hidden_size=d,
            num_heads=m.num_heads,
            num_kv_heads=m.num_kv_heads or m.num_heads,
            rotary=rotary if rotary is not None else rotary_from_config(m),
            dtype=dtype,
            init=init,
            lora={t: lora for t in ATTENTION_LORA_TARGETS if t in targets},
            layer_idx=layer_idx,
        )
        self.post_attention_layernorm = RMSNorm(d, eps=m.rms_norm_eps, dtype=dtype)
        self.mlp = SwiGLU(d, inter, dtype=dtype, init=init, lora=lora if "mlp" in targets else None)

        self.has_mvm = layer_has_mvm(m, layer_idx)
        if self.has_mvm:
            mvm_inter = mvm_intermediate_size(m)
            if self.placement == MVMPlacement.REPLACE and mvm_inter != inter:
                raise ValueError(
                    f"model.mvm.intermediate_size ({mvm_inter}) must equal model.intermediate_size ({inter}) "
                    "for placement=replace (the MVM starts as an exact copy of the MLP)"
                )
            # replace: weights are copied from the MLP after loading (build_model); parallel: the
            # zero down-projection makes the layer output equal to the base model's at init.
            self.mvm = SwiGLU(
                d,
                mvm_inter,
                dtype=dtype,
                zero_init_down=self.placement == MVMPlacement.PARALLEL,
                lora=lora if "mvm" in targets else None,
            )
            if self.stage == Stage.MOME:
                self.router = MoMERouter(
                    d,
                    num_experts=2,
                    init_std=m.mome.router_init_std,
                    kernel_backend=getattr(m.mome.kernel_backend, "value", m.mome.kernel_backend),
                    dtype=dtype,
                )

    def attention_context(self, hidden: torch.Tensor, position_ids: torch.Tensor, segment_ids: torch.Tensor | None):
        """The context for a caller that passes none (pipeline layers): built once per micro-batch and shared
        by the following layers that get the same ids (``cached_attention_context``)."""
        return cached_attention_context(
            position_ids=position_ids,
            segment_ids=segment_ids,
            rotary=self.self_attn.rotary_emb,
            dtype=hidden.dtype,
            backend=self.attention_backend,
        )

    def ffn(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stage-specific FFN part: u [B, S, D] -> (delta [B, S, D], gates [B, S, E] or None)."""
        if not self.has_mvm:
            return self.mlp(u), None
        if self.stage == Stage.MOME:
            experts = torch.stack([self.mlp(u), self.mvm(u)])  # [2, B, S, D]: both experts run on every token
            return self.router(u, experts)
        if self.placement == MVMPlacement.REPLACE:
            return self.mvm(u), None
        return self.mlp(u) + self.mvm(u), None

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        attn: AttentionContext | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [B, S, D], position_ids [B, S], segment_ids [B, S] (0 = pad) -> (hidden [B, S, D], gates)."""
        if attn is None:
            attn = self.attention_context(hidden, position_ids, segment_ids)
        h = hidden + self.self_attn(self.input_layernorm(hidden), attn)
        delta, gates = self.ffn(self.post_attention_layernorm(h))
        return h + delta, gates
