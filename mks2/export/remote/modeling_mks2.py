"""transformers wrapper of the MKS2 model for ``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``.

The network is the package's own ``MKS2ForCausalLM`` (bundled next to this file, see
``mks2.export.bundle``): this class only adapts it to transformers' ``PreTrainedModel`` /
``GenerationMixin`` interfaces. Its children ``model``, ``lm_head`` (and ``vision``, ``retrieval`` when
present) ARE the core model's modules, so parameter names equal the training names and the core's
``forward`` runs on the loaded weights.

Generation recomputes the whole prefix at every step (no key/value cache): correct for every stage
(MoME gates, image prefixes, packed or padded rows), quadratic in the generated length.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from mks2.config.schema import VisionKind
from mks2.export.remote.configuration_mks2 import MKS2LlamaConfig
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
    _no_split_modules = ["DecoderLayer"]
    # BLIP-2's Q-Former and query tokens are kept in fp32 by the vision front-end whatever the dtype.
    _keep_in_fp32_modules = ["qformer", "query_tokens"]
    _supports_sdpa = True
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
        self.post_init()

    @property
    def core(self) -> MKS2ForCausalLM:
        """The package model sharing this wrapper's modules (``forced_gates``, retrieval helpers, ...)."""
        return self._core[0]

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
        """input_ids [B, S] -> logits [B, S, V] (the last ``logits_to_keep`` positions when > 0)."""
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("MKS2LlamaForCausalLM takes input_ids (inputs_embeds are not supported)")
        out = self.core(
            input_ids,
            attention_mask=attention_mask,
            labels=labels,
            position_ids=position_ids,
            segment_ids=segment_ids,
            pixel_values=pixel_values,
            vision_features=vision_features,
        )
        logits = out.logits if not logits_to_keep else out.logits[:, -logits_to_keep:]
        return CausalLMOutputWithPast(loss=out.loss, logits=logits)

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        vision_features: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        # No cache: every step sees the whole sequence, images included (their placeholders stay in it).
        inputs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values
        if vision_features is not None:
            inputs["vision_features"] = vision_features
        return inputs
