"""transformers wrapper of the MKS2 model for ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``.

The network is the package's own ``MKS2ForCausalLM`` (bundled next to this file, see
``mks2.export.bundle``): this class only adapts it to transformers' ``PreTrainedModel`` /
``GenerationMixin`` interfaces. Its children ``model``, ``lm_head`` (and ``vision``, ``retrieval`` when
present) ARE the core model's modules, so parameter names equal the training names and the core's
``forward`` runs on the loaded weights.

Generation uses a key/value cache (transformers' ``DynamicCache``, created by ``generate()``): the
prompt, image prefixes included, is encoded once at prefill, then each step runs one token per row
over the cache, the core's own cached path (``MKS2ForCausalLM.forward(past_key_values=...)``) for
every stage (MVM, MoME routers and LoRA). ``use_cache=False`` recomputes the whole sequence per step.

Without autograd the decoder layers run fused (``mks2.export.remote.fused_inference``): q/k/v in one
matmul, every expert's projections and the router in two, LoRA folded in; fp32/fp64 weights only, the
saved weights unchanged. ``config.fused_inference=False`` (``from_pretrained(..., fused_inference=False)``)
or ``set_fused_inference(False)`` runs the package modules' own forward instead.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mks2.config.schema import VisionKind
from mks2.export.remote.configuration_mks2 import MKS2LlamaConfig
from mks2.export.remote.fused_inference import install_fused_inference, reuse_checked_plans, set_fused_inference
from mks2.model.dtypes import precision_of
from mks2.model.modeling import MKS2ForCausalLM


def _vision_dir(config: MKS2LlamaConfig) -> str:
    """Local directory of the vision tower's config.json (the model directory's ``vision_subfolder``)."""
    sub = config.vision_subfolder
    base = Path(str(config.name_or_path or "."))
    if (base / sub / "config.json").is_file():
        return str(base / sub)
    from transformers.utils import cached_file  # a Hub repository: fetch the small config file

    return str(Path(cached_file(str(base), f"{sub}/config.json")).parent)


class MKS2LlamaForCausalLM(PreTrainedModel, GenerationMixin):
    """MKS2 Llama (stage ``base``/``mvm``/``mome``) with the standard causal-LM interface.

    ``forward`` accepts the package's inputs besides the usual ones: ``pixel_values`` [N, 3, H, W] (or
    ``vision_features``) for the images whose placeholder ids (``mks2.vision.image_token_id``) the
    ``input_ids`` hold, and ``segment_ids`` for packed rows.
    """

    config_class = MKS2LlamaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = ["DecoderLayer", "FusedDecoderLayer"]
    # BLIP-2's Q-Former and query tokens are kept in fp32 by the vision front-end whatever the dtype.
    _keep_in_fp32_modules = ["qformer", "query_tokens"]
    _supports_sdpa = True
    _supports_cache_class = True
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # only when config.tie_word_embeddings

    def __init__(self, config: MKS2LlamaConfig):
        super().__init__(config)
        model_cfg = config.model_config()
        # transformers sets the default dtype to the requested one (``dtype=`` or config.json's) while
        # it builds the model; the core model allocates its weights in ``model_cfg.dtype``.
        model_cfg.dtype = precision_of(torch.get_default_dtype()) or model_cfg.dtype
        if model_cfg.vision.kind != VisionKind.NONE:
            model_cfg.vision.path = _vision_dir(config)
        # from_pretrained builds under torch.device("meta"); the core computes non-parameter state
        # (rotary frequencies, vision position ids) at construction, which must be real, so it is
        # built on the CPU. Weights about to be loaded are left uninitialised (no random-init cost).
        loading = torch.empty(0).is_meta
        skip_init = contextlib.nullcontext()
        if loading:
            from transformers.initialization import no_init_weights

            skip_init = no_init_weights()
        with torch.device("cpu"), skip_init:
            core = MKS2ForCausalLM(model_cfg, init=not loading, load_vision_weights=False)
        self.model = core.model
        self.lm_head = core.lm_head
        if core.vision is not None:
            self.vision = core.vision
        if core.retrieval is not None:
            self.retrieval = core.retrieval
        self._core = (core,)  # a tuple: not registered twice as a submodule
        install_fused_inference(core, enabled=bool(getattr(config, "fused_inference", True)))
        self.post_init()

    @property
    def core(self) -> MKS2ForCausalLM:
        """The package model sharing this wrapper's modules (``forced_gates``, retrieval helpers, ...)."""
        return self._core[0]

    def set_fused_inference(self, enabled: bool) -> None:
        """Run no-grad forwards through the fused layers (True, the default) or the package modules'
        own forward (False); either way the fused weights are dropped and rebuilt when next needed."""
        self.config.fused_inference = bool(enabled)
        set_fused_inference(self.core, enabled)

    def _init_weights(self, module: torch.nn.Module) -> None:
        # The core initialises its own weights at construction (or skips it when loading).
        pass

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """input_ids [B, S] -> logits [B, S, V] (the last ``logits_to_keep`` positions when > 0).

        With ``past_key_values`` (or ``use_cache`` and none yet) ``input_ids`` are the new tokens and
        ``attention_mask`` [B, past + S] covers the cached ones too; the cache is returned extended."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("MKS2LlamaForCausalLM takes input_ids (inputs_embeds are not supported)")
        use_cache = bool(getattr(self.config, "use_cache", False)) if use_cache is None else use_cache
        if past_key_values is None and use_cache and labels is None and segment_ids is None:
            past_key_values = DynamicCache(config=self.config)
        # A decode step over a cache reuses the fused layers' checks made when the sequence started.
        decoding = past_key_values is not None and past_key_values.get_seq_length() > 0
        with reuse_checked_plans(decoding):
            out = self.core(
                input_ids,
                attention_mask=attention_mask,
                labels=labels,
                position_ids=position_ids,
                segment_ids=segment_ids,
                pixel_values=pixel_values,
                vision_features=vision_features,
                past_key_values=past_key_values,
                logits_to_keep=logits_to_keep if labels is None else 0,
            )
        logits = out.logits if not logits_to_keep else out.logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=out.loss, logits=logits, past_key_values=past_key_values)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        vision_features: torch.Tensor | None = None,
        is_first_iteration: bool | None = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # transformers slices the new tokens and drops pixel_values after the prefill (when caching);
        # vision_features (pre-computed image features) follow the same rule: the prefix is in the
        # cache from the first step on. Without a cache every step re-reads the whole sequence.
        inputs = super().prepare_inputs_for_generation(input_ids, is_first_iteration=is_first_iteration, **kwargs)
        if vision_features is not None and (is_first_iteration or not kwargs.get("use_cache", True)):
            inputs["vision_features"] = vision_features
        return inputs
